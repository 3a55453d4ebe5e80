"""os/linux"""
