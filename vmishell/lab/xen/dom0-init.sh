#!/bin/busybox sh
# /init of the Xen lab's dom0 (rendered from vmishell/lab/xen/dom0-init.sh).
#
# dom0 is a PV guest of Xen running Debian's lab kernel and this busybox
# root. It starts Xen's toolstack daemons, mounts the host's root read-only
# over 9p (so the host's own Python runs the code under test, see
# /bin/vmishell-python), and then serves commands from the host on a
# virtio-serial port named vmishell.agent:
#
#   host -> dom0   @@in ID BASE64        a line of the command's stdin (optional, repeated)
#                  @@run ID SECONDS BASE64(shell script)
#   dom0 -> host   @@out ID BASE64       stdout, base64 in lines
#                  @@err ID BASE64       stderr
#                  @@done ID EXITCODE STDOUT-BYTES STDERR-BYTES
#
# Milestones go to the console (hvc0, which Xen copies to its serial line,
# the instance's serial.log) as `@@xen WORD ...` lines; `@@xen ready` means
# the toolstack answers and the command port is being served.
#
# Placeholders in double braces are filled in by vmishell.lab.xen.dom0fs.

export PATH={{TOOLSTACK_BIN}}:/usr/bin:/usr/sbin:/bin
export HOME=/root
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mkdir -p /dev/pts
/bin/busybox mount -t devpts devpts /dev/pts
/bin/busybox mount -t tmpfs tmpfs /tmp
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox --install -s /bin
exec </dev/console >/dev/console 2>&1

say() {
	printf '@@xen %s\n' "$*"
}
say init-started "$(cut -d' ' -f1 /proc/uptime)"

for m in {{MODULES}}; do
	insmod /lib/modules/$m.ko || say module-failed "$m"
done
mount -t xenfs xenfs /proc/xen || say xenfs-failed

# --- the host's root, read-only: its Python and the code under test -----------
if mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host; then
	# The host's other top-level directories appear at their own paths, bound
	# (not linked) so that paths resolve as on the host: caches keyed by path hit.
	for d in /host/*; do
		n=${d#/host/}
		case " {{OWN_DIRS}} " in *" $n "*) continue ;; esac
		if [ -d "$d" ] && [ ! -L "$d" ]; then
			mkdir -p "/$n" && mount --bind "$d" "/$n"
		elif [ ! -e "/$n" ]; then
			ln -s "$d" "/$n"
		fi
	done
	# Time zones for Python (pandas imports dateutil, which otherwise unpacks
	# its own tarball of them on every start: half a minute under TCG).
	[ -d /host/usr/share/zoneinfo ] && mkdir -p /usr/share && ln -s /host/usr/share/zoneinfo /usr/share/zoneinfo
	say host-root "$(cut -d' ' -f1 /proc/uptime)"
else
	say host-root-failed
fi
cat >/bin/vmishell-python <<'EOF'
#!/bin/sh
# The host's Python with the host's own C library (through its dynamic
# loader), dom0's Xen libraries last on the search path, the code under test
# first on PYTHONPATH, and the host user's HOME (read-only) for profiles.
. /vmi/dom0.conf
for v in VMISHELL_CACHE VMISHELL_PROFILE_PATH XDG_CACHE_HOME; do
	eval "x=\${VMI_ENV_$v:-}"
	[ -n "$x" ] && export "$v=$x"
done
export HOME="${VMI_HOME:-/root}" PYTHONPATH="${VMI_PYTHONPATH:-}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 IPYTHONDIR=/tmp/ipython MPLCONFIGDIR=/tmp
# The host's root is mounted cache=loose (fast lookups): forget what was
# cached so that code changed on the host since the last run is what runs.
echo 3 >/proc/sys/vm/drop_caches
if [ -n "${VMI_LOADER:-}" ]; then
	exec "$VMI_LOADER" --library-path "$VMI_LIBRARY_PATH:/usr/lib/x86_64-linux-gnu" "$VMI_PYTHON" "$@"
fi
exec "${VMI_PYTHON:-python3}" "$@"
EOF
chmod 755 /bin/vmishell-python
[ -e /usr/bin/python3 ] || ln -s /bin/vmishell-python /usr/bin/python3

# --- the toolstack -----------------------------------------------------------
mkdir -p /var/log/xen/console /var/lib/xen /var/lib/xenstored /run/xen /run/xenstored \
	/var/xen/dump /etc/xen
: >/etc/xen/xl.conf # xl's defaults are what the lab wants; it only warns when there is none
xenstored --pid-file=/run/xenstored.pid || say xenstored-failed
xen-init-dom0 || say xen-init-dom0-failed
# The instance's share: console logs written here appear on the host as they grow.
LOGDIR=/var/log/xen/console
mkdir -p /run/vmishell
if mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=512000 vmishell-run /run/vmishell; then
	mkdir -p /run/vmishell/console && LOGDIR=/run/vmishell/console
else
	say share-failed
fi
xenconsoled --log=guest --log-dir="$LOGDIR" || say xenconsoled-failed
xl info >/tmp/xl-info 2>&1 || say xl-info-failed
say xl-info "$(grep -E '^(xen_version|virt_caps)' /tmp/xl-info | tr -s ' ' | tr '\n' ' ')"

# --- the command port ------------------------------------------------------------
agent_port() {
	for p in /sys/class/virtio-ports/*; do
		[ "$(cat "$p/name" 2>/dev/null)" = vmishell.agent ] && echo "/dev/${p##*/}"
	done
}

run() {
	# $1 id, $2 seconds, $3 base64 of the script
	d=/tmp/agent
	printf '%s' "$3" | base64 -d >"$d/$1.sh"
	if [ -e "$d/$1.in" ]; then base64 -d <"$d/$1.in" >"$d/$1.stdin"; else : >"$d/$1.stdin"; fi
	# fd 3 (the port) is closed for the command: a port opens only once, and a
	# process still holding it (busybox timeout's watcher) would block the reopen.
	(cd / && timeout "$2" sh "$d/$1.sh" <"$d/$1.stdin" >"$d/$1.out" 2>"$d/$1.err" 3>&-)
	rc=$?
	base64 "$d/$1.out" | sed "s/^/@@out $1 /"
	base64 "$d/$1.err" | sed "s/^/@@err $1 /"
	# The sizes let the host tell a complete answer from one cut short.
	printf '@@done %s %s %s %s\n' "$1" "$rc" "$(wc -c <"$d/$1.out")" "$(wc -c <"$d/$1.err")"
	rm -f "$d/$1".*
}

session() {
	while IFS=' ' read -r tag id arg rest <&3; do
		case "$tag" in
		@@in) printf '%s\n' "$arg" >>"/tmp/agent/$id.in" ;;
		@@run) run "$id" "$arg" "$rest" >&3 ;;
		esac
	done
}

serve() {
	mkdir -p /tmp/agent
	while :; do
		# The port reads as end-of-file while no host is connected: wait and reopen.
		# (A redirection on a function call fails softly where `exec 3<>` would end the shell.)
		session 3<>"$1"
		sleep 0.2
	done
}

PORT=$(agent_port)
if [ -z "$PORT" ]; then
	say agent-port-missing
else
	say ready "$(cut -d' ' -f1 /proc/uptime)" port="$PORT"
	# Served by a child: pid 1 must never exit, whatever happens to the agent.
	while :; do
		serve "$PORT" </dev/null &
		wait $!
		say agent-restarted
	done
fi
while :; do sleep 3600; done
