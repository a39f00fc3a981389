"""The placement planner (DistServe's search, DESIGN.md section 1): profile the compiled
programs (``profiler`` -> a ``profile`` file of fitted ``latency`` models), simulate a preset
on it by driving the scheduling core on a virtual clock (``system``, ``simulate``), search the
placements that maximize per-GPU goodput (``search``) and write the winner as a mesh preset
(``preset_out``). ``trace`` records what a server saw, to plan again from it. The CLI is
``python -m jdisagg.plan`` (README, "Planner")."""
