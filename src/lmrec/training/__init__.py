"""The shared training machinery: the one loop (``loop``) and the run skeleton every command opens (``run``)."""
