"""One adapter variant written straight into a local folder, without Ray or a manifest: what a
search's engine needs for each alpha it probes (committed variants go through
:func:`expo_ray.publish.run.run_plan` instead). The bytes are those ``expo-ray extrapolate``
writes: the same plan, the same shard task."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint.folder import Checkpoint
from ..extrapolation.shard_task import ShardJob, run_shard
from ..options import PlanOptions
from .adapter import CONFIG_FILE, open_adapter
from .plan import lora_plan

CHUNK_BYTES = 64 * 1024 * 1024


def write_adapter_variant(sft: str, adapter: str, alpha: float, out_dir: str,
                          options: PlanOptions = PlanOptions()) -> str:
    """Write the adapter variant for ``alpha`` of ``adapter`` (on the SFT model ``sft``) into the
    local folder ``out_dir``; returns it."""
    import dataclasses

    options = dataclasses.replace(options, merge=False)
    plan = lora_plan(Checkpoint.open(sft), open_adapter(adapter), (float(alpha),), options)
    out = Path(out_dir)
    root, name = str(out.parent), out.name
    os.makedirs(out, exist_ok=True)
    job = ShardJob(plan.shards[0], plan.sources["sft"], plan.sources["aligned"], root, (float(alpha),), (name,),
                   ("local",), CHUNK_BYTES, options.allow_nonfinite)
    run_shard(job)
    (out / CONFIG_FILE).write_text(json.dumps(plan.config_for(alpha), indent=2, sort_keys=True) + "\n")
    return str(out)
