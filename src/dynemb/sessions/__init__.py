"""Per-user sessions: E_t updated event by event instead of recomputed over the history.

`state` holds what a session keeps (a typed record per user, and the bounded store that
evicts them); `engine` advances a batch of sessions by their new events with the same
stage versions the ensembles serve; `serving` is the Triton model `session` over both.
The session wiring (which stage computes what for a new event) lives in `engine`, next
to the ensembles' wiring in dynemb.ensembles.
"""
