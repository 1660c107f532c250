"""What `dynemb bench` runs: the served pipeline side by side with the same code
in-process and with a plain web server, perf_analyzer's cross-check, the runtime sweep
and the memory soak."""
