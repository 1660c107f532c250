"""Hot-swap one stage under load: check, probe drift, install as the next version, verify,
and restore the previous state on any failure."""
