"""Adaptive alpha search: :mod:`.adaptive` (the schedule, engine-free) and :mod:`.driver` (one
swapping generation engine and one reward engine on Ray, the report, the winner materialized).

It builds on evaluation (engines, prompts, selection) and publish (materializing the winner);
only sweep, demo, api and cli import it.
"""
