#!/usr/bin/env bash
# Extrapolate allenai/tulu-2-dpo-70b from its SFT parent allenai/tulu-2-70b on a Ray cluster,
# reading both from S3 and writing one committed variant per alpha to S3.
#
#   RAY_ADDRESS=http://HEAD:8265 OUT=s3://my-bucket/expo/tulu-2-dpo-70b jobs/extrapolate-tulu-2-dpo-70b.sh
#
# The cluster's image has expo-ray installed (infra/); its nodes get S3 credentials from their own
# AWS chain (instance role / IRSA). Both checkpoints must be safetensors; copy them to S3 once,
# e.g. with `huggingface-cli download` + `aws s3 sync`, or read them straight from the Hub with
# SFT=hf://allenai/tulu-2-70b (each task then downloads only the shards it needs).
# The job is idempotent: submitting it again skips finished variants and verified shards.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://127.0.0.1:8265}"
SFT="${SFT:-s3://my-models/allenai/tulu-2-70b}"
ALIGNED="${ALIGNED:-s3://my-models/allenai/tulu-2-dpo-70b}"
OUT="${OUT:-s3://my-expo-results/tulu-2-dpo-70b}"
ALPHAS="${ALPHAS:-0.1,0.2,0.3,0.4,0.5}"
ENDPOINT_ENV=""
if [[ -n "${AWS_ENDPOINT_URL:-}" ]]; then
  ENDPOINT_ENV="\"AWS_ENDPOINT_URL\": \"${AWS_ENDPOINT_URL}\","
fi

exec ray job submit --address "$RAY_ADDRESS" \
  --submission-id "expo-tulu-2-dpo-70b-$(date +%Y%m%d-%H%M%S)" \
  --runtime-env-json "{\"env_vars\": {${ENDPOINT_ENV} \"EXPO_RAY_S3_PART_MIB\": \"64\"}}" \
  -- expo-ray extrapolate \
    --sft "$SFT" --aligned "$ALIGNED" --alpha "$ALPHAS" --out "$OUT" \
    --chunk-mib 256
