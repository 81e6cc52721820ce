#!/usr/bin/env bash
# The same job against a Ray head and an S3-compatible store on this machine (for example the
# SeaweedFS server expo-ray embeds, `expo_ray/storage/embedded_s3.py`): the submit command for a
# `ray start --head` on loopback. tests/test_job_submit.py runs exactly this path.
#
#   ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1
#   AWS_ENDPOINT_URL=http://127.0.0.1:8333 SFT=s3://models/sft ALIGNED=s3://models/aligned \
#     OUT=s3://variants/run1 jobs/extrapolate-local-s3.sh
set -euo pipefail
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --runtime-env-json "{\"env_vars\": {\"AWS_ENDPOINT_URL\": \"${AWS_ENDPOINT_URL:?}\"}}" \
  -- expo-ray extrapolate --sft "${SFT:?}" --aligned "${ALIGNED:?}" --alpha "${ALPHAS:-0.1,0.3,0.5}" \
    --out "${OUT:?}"
