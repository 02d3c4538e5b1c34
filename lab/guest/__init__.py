"""The host's view of a running guest: SSH/SFTP and workloads run through it."""
