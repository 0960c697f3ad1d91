#!/usr/bin/env bash
# Checks the node pack and our LoRA files against a real ComfyUI (never part of the test suite).
#
#   scripts/check_in_comfyui.sh COMFYUI_DIR [PYTHON]
#
# COMFYUI_DIR: a ComfyUI checkout (or an exported tree); PYTHON: the Python that runs it, with ComfyUI's
# requirements and this project installed (`pip install --no-deps -e .` plus gguf, and peft / accelerate for
# training). The script links custom_nodes_flux2 into COMFYUI_DIR/custom_nodes, writes the demo models and a
# demo dataset into COMFYUI_DIR's models/ and input/, starts ComfyUI on 127.0.0.1:$PORT (default 8199) and checks:
#   a. the pack imports (no import error in ComfyUI's log) and its 14 node types are in /object_info;
#   b. the pack's workflows (klein text to image and two-reference edit at 256 px, img2img through ComfyUI's
#      LoadImage + ImageScaleToTotalPixels) save the same pixels in ComfyUI as in `flux2 run`;
#   c. on tiny klein- and dev-shaped DiTs with the real head width (ComfyUI cannot load the demo DiTs):
#      LoRA / LoKr / LoHa files from `flux2 train` (and LoRAs on every linear layer, as written and converted
#      to kohya) load through ComfyUI's UNETLoader + LoraLoaderModelOnly with no "lora key not loaded" line;
#      ComfyUI's patched weights (ModelSave) equal our merge, its DiT output changes and equals our engine's;
#      the all-layer LoRAs converted to diffusers: ComfyUI skips the layers `lora convert` warns about (reported);
#   d. the pack's Flux2TrainLoRA and Flux2TrainFromConfig nodes train in ComfyUI (its inference mode).
# Work files go to $WORK (default: a new temporary folder). Exits non-zero at the first failed check.
set -euo pipefail

COMFY=$(cd "${1:?usage: $0 COMFYUI_DIR [PYTHON]}" && pwd)
PY=${2:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PORT=${PORT:-8199}
SERVER=http://127.0.0.1:$PORT
WORK=${WORK:-$(mktemp -d)}
RUN=$(date +%s)  # in every output name: ComfyUI caches a node whose inputs did not change, and would save nothing
CHECK=("$PY" "$REPO/scripts/comfyui_check.py")
FLUX2=("$PY" -m flux2_host.cli)
KLEIN=flux2_check/klein-base-hd128.safetensors
DEV=flux2_check/dev-hd128.safetensors
mkdir -p "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

echo "== versions"
"$PY" - "$COMFY" <<'EOF'
import runpy, sys, torch
version = runpy.run_path(f"{sys.argv[1]}/comfyui_version.py")["__version__"]
print(f"ComfyUI {version}, Python {sys.version.split()[0]}, torch {torch.__version__}")
EOF
git -C "$COMFY" rev-parse HEAD 2>/dev/null || echo "(ComfyUI tree without git)"

echo "== setup (work folder $WORK)"
ln -sfn "$REPO/custom_nodes_flux2" "$COMFY/custom_nodes/custom_nodes_flux2"
"${FLUX2[@]}" demo-models --dir "$COMFY/models" | tail -1
[ -f "$COMFY/models/diffusion_models/$KLEIN" ] || "${CHECK[@]}" write-dit "$COMFY/models/diffusion_models/$KLEIN"
[ -f "$COMFY/models/diffusion_models/$DEV" ] || "${CHECK[@]}" write-dit --guidance "$COMFY/models/diffusion_models/$DEV"
"$PY" -c "import sys; from flux2_host.demo_inputs import write_demo_dataset; write_demo_dataset(sys.argv[1])" \
    "$COMFY/input"
cat > "$WORK/dataset.toml" <<EOF
[general]
resolution = 64
caption_extension = ".txt"
batch_size = 1
enable_bucket = true

[[datasets]]
image_directory = "$COMFY/input/flux2_demo_dataset"
EOF

echo "== starting ComfyUI on $SERVER (log: $WORK/comfyui.log)"
if curl -s -o /dev/null "$SERVER/"; then echo "port $PORT is in use: stop that server or set PORT"; exit 1; fi
# Unbuffered: the checks read ComfyUI's log ("lora key not loaded") right after each prompt.
(cd "$COMFY" && PYTHONUNBUFFERED=1 exec "$PY" main.py --cpu --listen 127.0.0.1 --port "$PORT" \
    > "$WORK/comfyui.log" 2>&1) &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 180); do
    curl -sf -o /dev/null "$SERVER/object_info/SaveImage" && break
    kill -0 $SERVER_PID 2>/dev/null || { tail -30 "$WORK/comfyui.log"; exit 1; }
    sleep 1
done
log_since() { tail -n +"$(( $1 + 1 ))" "$WORK/comfyui.log"; }
log_lines() { wc -l < "$WORK/comfyui.log"; }

echo "== a. the pack loads"
if grep -E "(Cannot import|IMPORT FAILED).*custom_nodes_flux2" "$WORK/comfyui.log"; then exit 1; fi
grep "custom_nodes_flux2" "$WORK/comfyui.log" || true
"${CHECK[@]}" object-info --server "$SERVER" --expect 14

echo "== b. the pack's workflows: ComfyUI vs flux2 run"
same_pixels() {  # WORKFLOW SAVE_NODE [--set ...]: flux2 run, then its PNG's prompt queued in ComfyUI
    local workflow=$1 save=$2 host_png outputs comfy_png
    shift 2
    "${FLUX2[@]}" run "$REPO/workflows/$workflow.json" "$@" --models-dir "$COMFY/models" --input-dir "$COMFY/input" \
        --output-dir "$WORK/host/$workflow" --cpu --json > "$WORK/$workflow.json" 2> "$WORK/$workflow.log"
    host_png=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['files'][0])" "$WORK/$workflow.json")
    outputs=$("${CHECK[@]}" post "$host_png" --server "$SERVER" \
        --set "$save.filename_prefix=\"flux2_check/${workflow}_$RUN\"" | tail -1)
    comfy_png=$("$PY" -c "import json, sys; i = json.loads(sys.argv[1])[sys.argv[2]]['images'][0]
print(i['subfolder'] + '/' + i['filename'])" "$outputs" "$save")
    echo -n "$workflow: "
    "${CHECK[@]}" compare-images "$host_png" "$COMFY/output/$comfy_png"
}
"$PY" -c "import sys; from flux2_host.demo_inputs import write_demo_inputs; write_demo_inputs(sys.argv[1])" \
    "$COMFY/input"
same_pixels flux2_klein_text_to_image 9 --set 6.width=256 --set 6.height=256
same_pixels flux2_klein_edit_two_references 13 --set 10.width=256 --set 10.height=256
same_pixels flux2_klein_img2img 11  # ComfyUI's LoadImage and ImageScaleToTotalPixels feed the pack's nodes

echo "== c. LoRA files from flux2 train in ComfyUI's LoraLoaderModelOnly"
ALL_LINEARS='(img_in|txt_in|(time_in|guidance_in)\.(in|out)_layer|(double_stream_modulation_(img|txt)|single_stream_modulation)\.lin|final_layer\.(adaLN_modulation\.1|linear)|double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12])'
mkdir -p "$COMFY/models/loras/flux2_check"
train() {  # DIT TEXT_ENCODER MODEL_VERSION NAME NETWORK_TYPE [options]: into models/loras/flux2_check/NAME
    local dit=$1 encoder=$2 version=$3 name=$4 type=$5
    shift 5
    (cd "$WORK" && "${FLUX2[@]}" train --dit "$COMFY/models/diffusion_models/$dit" \
        --vae "$COMFY/models/vae/flux2-vae.safetensors" --text_encoder "$COMFY/models/text_encoders/$encoder" \
        --dataset_config "$WORK/dataset.toml" --output_dir "$WORK/train" --output_name "$name" --max_train_steps 2 \
        --network_type "$type" --network_dim 4 --network_alpha 2 --learning_rate 1e-2 --seed 1 \
        --model_version "$version" "$@" 2>&1 | grep -E "^step|^saved")
    cp "$WORK/train/$name.safetensors" "$COMFY/models/loras/flux2_check/"
}
convert() {  # NAME FORMAT: models/loras/flux2_check/NAME_FORMAT
    "${FLUX2[@]}" lora convert "$WORK/train/$1.safetensors" "$COMFY/models/loras/flux2_check/$1_$2.safetensors" \
        --to "$2"
}
lora_prompt() {  # DIT PREFIX NAME...: UNETLoader -> LoraLoaderModelOnly -> ModelSave; prints the unmatched keys
    local dit=$1 prefix=$2 args=() before
    shift 2
    for name in "$@"; do args+=(--lora "flux2_check/$name.safetensors"); done
    "${CHECK[@]}" lora-prompt --unet "$dit" --prefix "flux2_check/$prefix" "${args[@]}" > "$WORK/$prefix.json"
    before=$(log_lines)
    "${CHECK[@]}" post "$WORK/$prefix.json" --server "$SERVER" | sed -n 1p
    log_since "$before" | grep "lora key not loaded" || true
}
forward() {  # DIT NAME...: ComfyUI's DiT output with each LoRA against ours
    (cd "$COMFY" && "$PY" "$REPO/scripts/comfyui_forward_check.py" "$1" \
        $(for name in "${@:2}"; do echo "flux2_check/$name.safetensors"; done) 2>&1 | grep "^LoRA")
}
check_loras() {  # DIT NAME...: every key loads, ComfyUI's merge and output equal ours
    local dit=$1 prefix=loras_${RUN}_$(basename "$1" .safetensors) unmatched
    unmatched=$(lora_prompt "$dit" "$prefix" "${@:2}")
    echo "$unmatched"
    if grep -q "lora key not loaded" <<< "$unmatched"; then exit 1; fi
    for name in "${@:2}"; do
        "${CHECK[@]}" compare-lora --comfy-base "$COMFY/output/flux2_check/$prefix/base_00001_.safetensors" \
            --comfy-patched "$COMFY/output/flux2_check/$prefix/${name}_00001_.safetensors" \
            --dit "$COMFY/models/diffusion_models/$dit" --lora "$COMFY/models/loras/flux2_check/$name.safetensors"
    done
    forward "$dit" "${@:2}"
}
skipped_in_diffusers() {  # DIT NAME: reported, not a failure (a limit of ComfyUI's diffusers names)
    echo "-- $2 (ComfyUI skips the layers lora convert warned about):"
    lora_prompt "$1" "diffusers_${RUN}_$2" "$2" | { grep -c "lora key not loaded" || true; } \
        | sed 's/$/ lora keys not loaded/'
    forward "$1" "$2" || true
}
train "$KLEIN" qwen_3_4b.safetensors klein-base-4b lora lora
train "$KLEIN" qwen_3_4b.safetensors klein-base-4b lokr lokr
train "$KLEIN" qwen_3_4b.safetensors klein-base-4b loha loha
train "$KLEIN" qwen_3_4b.safetensors klein-base-4b all_layers lora --target_modules "$ALL_LINEARS"
train "$DEV" mistral_3_small_flux2_bf16.safetensors dev dev_all_layers lora --target_modules "$ALL_LINEARS"
for name in all_layers dev_all_layers; do convert $name kohya; convert $name diffusers; done
echo "-- klein-shaped DiT"
check_loras "$KLEIN" lora lokr loha all_layers all_layers_kohya
echo "-- dev-shaped DiT"
check_loras "$DEV" dev_all_layers dev_all_layers_kohya
skipped_in_diffusers "$KLEIN" all_layers_diffusers
skipped_in_diffusers "$DEV" dev_all_layers_diffusers

echo "== d. the pack's training nodes in ComfyUI"
"$PY" - "$WORK" "$KLEIN" "$RUN" "$COMFY" <<'EOF'
import json, sys
work, dit, run, comfy = sys.argv[1:]
widgets = {"dit": dit, "vae": "flux2-vae.safetensors", "text_encoder": "qwen_3_4b.safetensors",
           "dataset": "flux2_demo_dataset", "model_version": "klein-base-4b", "network_type": "lora", "network_dim": 4,
           "network_alpha": 2.0, "learning_rate": 0.01, "optimizer_type": "adamw", "max_train_steps": 2,
           "batch_size": 1, "resolution": 64, "timestep_sampling": "flux2_shift", "gradient_checkpointing": False,
           "fp8_base": False, "blocks_to_swap": 0, "seed": 1, "save_every_n_steps": 0,
           "output_name": f"flux2_check_{run}", "sample_prompt": "", "sample_every_n_steps": 0, "resume": "",
           "more_options": ""}
with open(f"{work}/train_config.toml", "w") as config:
    config.write(f'dit = "{comfy}/models/diffusion_models/{dit}"\nvae = "{comfy}/models/vae/flux2-vae.safetensors"\n'
                 f'text_encoder = "{comfy}/models/text_encoders/qwen_3_4b.safetensors"\n'
                 f'model_version = "klein-base-4b"\ndataset_config = "{work}/dataset.toml"\n'
                 f'output_dir = "{work}/node_train"\noutput_name = "from_config_{run}"\nnetwork_dim = 2\n')
prompt = {"1": {"class_type": "Flux2LoadModel", "inputs": {"model_name": dit, "weight_dtype": "default"}},
          "2": {"class_type": "Flux2TrainLoRA", "inputs": {"model": ["1", 0], **widgets}},
          "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 1], "filename_prefix": f"flux2_check/loss_{run}"}},
          "4": {"class_type": "Flux2TrainFromConfig", "inputs": {"config_path": f"{work}/train_config.toml",
                                                                  "overrides": "max_train_steps = 2"}}}
json.dump(prompt, open(f"{work}/train_nodes.json", "w"))
EOF
BEFORE=$(log_lines)
"${CHECK[@]}" post "$WORK/train_nodes.json" --server "$SERVER" --timeout 900 | sed -n 1p
log_since "$BEFORE" | grep -E "^step|^saved"
ls "$COMFY/output/flux2_training/flux2_check_$RUN.safetensors" "$WORK/node_train/from_config_$RUN.safetensors"
echo "== all checks passed"
