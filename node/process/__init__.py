"""Process plumbing: forked children that die with the daemon, the one bounded wait, and the local swarm of separate
`swarm-node run` processes that the demo, the benches and the tests start.
"""
