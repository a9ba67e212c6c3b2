"""When a peer fails: detection (the hop watch, failed sends, the planner's pings), the declared-dead set, reports to
origins, re-route notices and path repair, built together as one `Faults` component.
"""
