"""Service mode: the daemon, its configuration, control socket and systemd notification."""
