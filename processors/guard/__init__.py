"""The guard: policy outside the model, between a decision and anything reaching a tool topic.

Every decision, whoever made it (the rules or a model), is judged here before it is stored; the
verdict is stored with it (``DecisionRecorded.guard_outcome``, ``guard_reason``, ``policy_version``),
so the run's log says for every command what policy allowed it, and for every refusal why.
"""
