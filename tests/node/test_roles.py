from experts.sizing import choose_domain
from node.roles.choice import Role, choose_stages, stage_in_need
from protocol.records import NodeRecord, NodeState


def members(*stage_lists) -> dict[str, NodeRecord]:
    return {f"p{i}": NodeRecord(peer_id=f"p{i}", endpoint=f"h:{i}", stages=tuple(stages), compute_s={},
                                memory_slots=8, role="expert" if not stages else "stage", version="v", swarm="s",
                                round=1, state=NodeState.SERVING) for i, stages in enumerate(stage_lists)}


def test_auto_takes_a_short_stage_or_trains_experts():
    full = members([0], [0], [1], [1], [])
    assert stage_in_need(full, 2, min_replicas=2) is None
    assert choose_stages(Role.AUTO, None, full, 2, 2) == []  # experts
    assert choose_stages(Role.AUTO, None, members([0], [0], [1]), 2, 2) == [1]
    assert choose_stages(Role.AUTO, None, members([1], [1]), 2, 1) == [0]  # no data node
    assert choose_stages(Role.AUTO, [1], full, 2, 2) == [1]  # explicit stages win
    assert choose_stages(Role.STAGE, None, members([0], [1], [1]), 2, 1) == [0]  # fewest replicas
    assert choose_stages(Role.EXPERT, None, {}, 2, 1) == []


def test_domain_choice_follows_difficulty_weighted_shares():
    difficulty = {"easy": 1.0, "hard": 3.0}
    assert choose_domain(difficulty, {}, {"easy", "hard"}) == "hard"  # nothing spent: the hardest first
    assert choose_domain(difficulty, {"hard": 10.0}, {"easy", "hard"}) == "easy"  # hard is past its 3/4
    assert choose_domain(difficulty, {"hard": 8.0, "easy": 4.0}, {"easy", "hard"}) == "hard"  # 8 < 12 * 3/4
    assert choose_domain(difficulty, {"hard": 10.0}, {"hard"}) == "hard"  # only the bytes it holds
    assert choose_domain(difficulty, {}, set()) is None
