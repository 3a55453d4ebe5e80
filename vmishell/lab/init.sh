#!/bin/busybox sh
# /init of a vmishell lab guest (rendered from vmishell/lab/init.sh by Python).
#
# Why it looks like this: vmishell's tests compare what they read from guest
# RAM with what the guest kernel itself says. So this script starts a few
# long-running processes with known names, then prints the kernel's own view
# ("ground truth") on the serial console as lines
#
#     @@vmi KIND FIELD...
#
# each written by ONE printf (a printk arriving mid-line cannot split a field
# list across two writes of ours), and finally idles forever WITHOUT forking,
# so the process list printed last stays true for as long as the guest runs.
# Every command that spawns a process runs before that list; the list itself
# is walked with shell builtins only (for, read, printf, $((...))).
#
# Placeholders in double braces are filled in by vmishell.lab.bootscript.

export PATH=/bin:/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs tmpfs /tmp
/bin/busybox --install -s /bin
exec </dev/console >/dev/console 2>&1

vmi() {
	# One printf per line; "$*" joins the fields with single spaces.
	printf '@@vmi %s\n' "$*"
}

vmi boot init-started

# --- long-running processes with distinctive names ---------------------------
/bin/vmi-marker &
MARKER_PID=$!
sleep 2147483647 &
SLEEP_PID=$!
mkfifo /run/idle.fifo /run/cat.fifo
cat /run/cat.fifo &
CAT_PID=$!
# Two more long-running processes, to be put in states that do not change:
# stopped and frozen (named apart from the sleeper, which tests look up by name).
tail -f /dev/null &
STOPPED_PID=$!
tail -f /dev/null &
FROZEN_PID=$!

# --- optional user scenario (copied in by `vmishell lab up --init SCRIPT`) ----
if [ -e /vmi/scenario ]; then
	/bin/sh /vmi/scenario </dev/null >/dev/console 2>&1 &
	vmi scenario-pid $!
fi

sleep {{SETTLE_SECONDS}}

# --- tasks whose state stays put: stopped ("T") and frozen ("D" on 6.1) ----------
kill -STOP "$STOPPED_PID"
FREEZER=/sys/fs/cgroup/freezer
if mount -t tmpfs cgroup /sys/fs/cgroup && mkdir $FREEZER &&
	mount -t cgroup -o freezer freezer $FREEZER && mkdir $FREEZER/frozen; then
	echo "$FROZEN_PID" >$FREEZER/frozen/tasks
	echo FROZEN >$FREEZER/frozen/freezer.state
	tries=0
	while read -r frozen <$FREEZER/frozen/freezer.state && [ "$frozen" != FROZEN ] &&
		[ $tries -lt 50 ]; do
		sleep 0.1
		tries=$((tries + 1))
	done
fi

# --- the kernel's view of itself ----------------------------------------------
read -r RELEASE </proc/sys/kernel/osrelease
vmi uname "$RELEASE" "$(uname -m)"
while IFS= read -r line; do
	case "$line" in
	"address sizes"*)
		set -- ${line#*: }
		vmi cpu phys_bits="$1" virt_bits="$4"
		break
		;;
	esac
done </proc/cpuinfo
read -r MELTDOWN </sys/devices/system/cpu/vulnerabilities/meltdown &&
	vmi meltdown "$MELTDOWN"
read -r CMDLINE </proc/cmdline
vmi cmdline "$CMDLINE"
while read -r key value unit; do
	[ "$key" = MemTotal: ] && vmi meminfo MemTotal "$value" "$unit"
done </proc/meminfo
grep -E ' ({{SYMBOLS}})$' /proc/kallsyms >/tmp/syms
while read -r addr type name; do
	vmi symbol "$name" "$addr" "$type"
done </tmp/syms
while IFS= read -r line; do
	vmi iomem "$line"
done </proc/iomem

# --- the marker process -------------------------------------------------------
vmi marker pid="$MARKER_PID" marker_va={{MARKER_VA}} counter_va={{COUNTER_VA}}
vmi pids sleep="$SLEEP_PID" cat="$CAT_PID" stopped="$STOPPED_PID" frozen="$FROZEN_PID"
MAPS=0
while IFS= read -r line; do
	vmi map "$line"
	MAPS=$((MAPS + 1))
	case "$line" in
	*' r-xp '*/bin/vmi-marker) range=${line%% *}; TEXT_VA=$((0x${range%-*})) ;;
	*'[stack]') range=${line%% *}; STACK_VA=$((0x${range#*-} - 8)) ;;
	*'[vdso]') range=${line%% *}; VDSO_VA=$((0x${range%-*})) ;;
	*'[vvar]') range=${line%% *}; VVAR_VA=$((0x${range%-*})) ;;
	esac
done </proc/$MARKER_PID/maps

# pagemap has one entry per page of the kernel's PAGE_SIZE (4 KiB on x86, 4 or
# 16 KiB on arm64): the kernel says which in smaps.
PAGE_SIZE=4096
while read -r key value unit; do
	[ "$key" = KernelPageSize: ] && PAGE_SIZE=$((value * 1024)) && break
done </proc/$MARKER_PID/smaps
vmi pagesize "$PAGE_SIZE"

pagemap() {
	# $1 label, $2 virtual address. dd seeks (od -j would read its way there).
	entry=$(dd if=/proc/$MARKER_PID/pagemap bs=8 skip=$(($2 / PAGE_SIZE)) count=1 2>/dev/null | od -An -tx8)
	set -- "$1" "$2" $entry
	if [ -n "$3" ]; then
		vmi pagemap "$1" "$(printf '%x' "$2")" "$3" "$(printf '%x' $((0x$3 & 0x7fffffffffffff)))"
	else
		vmi pagemap "$1" "$(printf '%x' "$2")" unreadable
	fi
}
pagemap marker {{MARKER_VA}}
pagemap counter {{COUNTER_VA}}
[ -n "$TEXT_VA" ] && pagemap text "$TEXT_VA"
[ -n "$STACK_VA" ] && pagemap stack "$STACK_VA"
[ -n "$VDSO_VA" ] && pagemap vdso "$VDSO_VA"
[ -n "$VVAR_VA" ] && pagemap vvar "$VVAR_VA"

# --- every task, threads included: builtins only from here on ------------------
TASKS=0
for t in /proc/[0-9]*/task/[0-9]*; do
	[ -r "$t/status" ] || continue
	read -r stat 2>/dev/null <"$t/stat" || continue
	read -r comm 2>/dev/null <"$t/comm" || continue
	tgid='' uid=''
	while read -r key value rest; do
		case "$key" in
		Tgid:) tgid=$value ;;
		Uid:) uid=$value; break ;;
		esac
	done <"$t/status"
	# After the last ") " of stat: state ppid pgrp session tty tpgid flags ...,
	# field 22 (start time, clock ticks since boot) is the 20th.
	set -- ${stat##*) }
	# PF_KTHREAD is 0x00200000 in task flags.
	printf '@@vmi task %s %s %s %s %s %s %s %s\n' "${t##*/}" "$tgid" "$2" "$uid" \
		$((($7 >> 21) & 1)) "$1" "${20}" "$comm"
	TASKS=$((TASKS + 1))
done
# format=2: task lines carry the start time before the name.
vmi ready tasks=$TASKS maps=$MAPS format=2

# --- idle forever as pid 1, forking nothing -----------------------------------
while :; do
	read -r _ </run/idle.fifo
done
