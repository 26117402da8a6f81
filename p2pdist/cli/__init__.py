"""The p2pdist command: role start-up, p2pdist get and mirror-config."""
