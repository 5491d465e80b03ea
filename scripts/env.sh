# Offline defaults shared by the pipeline and test scripts (source this file).
# The data/model folders default to ../shared next to the checkout; override to use your own copies.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LAYERFOLD_DATA_DIR="${LAYERFOLD_DATA_DIR:-$here/../shared/datasets}"
export LAYERFOLD_MODELS_DIR="${LAYERFOLD_MODELS_DIR:-$here/../shared/models}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export WANDB_MODE="${WANDB_MODE:-disabled}" DVC_NO_ANALYTICS=1 TOKENIZERS_PARALLELISM=false
