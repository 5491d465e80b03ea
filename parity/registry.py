"""The seed methods' parity: the two sides of each method, what each adapts, how they compare."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from parity.come import COME_PRESET, COME_P_PRESET, compare_come, released_come
from parity.laco import compare_laco, layerfold_laco, released_laco
from parity.mka import MKA_PRESETS, compare_mka, mka_scoring, released_mka
from parity.runner import Outcome, Settings, run_layerfold
from parity.shortgpt import compare_shortgpt, released_shortgpt
from parity.streamline import STREAMLINE_PRESET, compare_streamline, released_streamline


def layerfold_side(method: str, preset: list[str]) -> Callable[[Settings, torch.Tensor], Outcome]:
    """layerfold's side of ``method``: ``preset`` plus the run's ``num_remove`` and the method's overrides."""

    def side(settings: Settings, blocks: torch.Tensor) -> Outcome:
        overrides = preset + [f"method.num_remove={settings.num_remove}"] + settings.overrides.get(method, [])
        return run_layerfold(settings, blocks, settings.method_config(overrides))

    return side


@dataclass(frozen=True)
class Parity:
    sides: dict[str, Callable[[Settings, torch.Tensor], Outcome]]
    timed: dict[str, str]  # side -> label of its timing row
    compare: Callable[[dict[str, Outcome], float], list[dict]]
    adaptations: tuple[str, ...]


COMMON_ADAPTATIONS = (
    "model: loaded once from the local checkpoint with layerfold's loader, in the run's dtype and device, and handed to the "
    "released code where it calls from_pretrained (same weights on both sides)",
    "hard-coded .cuda() / .to('cuda') calls go to the run device when it is not CUDA",
)

COME_ADAPTATIONS = COMMON_ADAPTATIONS + (
    "main.py's sequence: get_args (--method concat_merge --target-layers L-k; --merge-item, --psu, --min-max and "
    "--wo-repeat from the preset; defaults otherwise), "
    "set_seed, ModelHandler, main_func; ModelHandler is built with merge_method=False on the stock model because "
    "models_unit/llama/modeling_llama.py (transformers ~4.45) does not build under this transformers",
    "the patched file's extra outputs come from hooks: heads_embed = L1_Correlation(o_proj input, o_proj.weight) "
    "viewed (b, s, kv_heads, groups, head_dim), mlp_embed = L1_Correlation(down_proj input, down_proj.weight), "
    "with the file's own L1_Correlation",
    "calibration: get_trainloaders returns the pipeline's blocks flattened to one row (model.seqlen = block length), "
    "instead of 256 shuffled WikiText-2 rows from the hub",
    "ModelHandler.save (a full checkpoint write) is skipped; the importance tensors and the info JSON are still written",
)

PARITY: dict[str, Parity] = {
    "laco": Parity(
        sides={"released": released_laco, "layerfold": layerfold_laco},
        timed={"released": "released notebook loop", "layerfold": "layerfold laco_code_parity"},
        compare=compare_laco,
        adaptations=COMMON_ADAPTATIONS + (
            "notebook cells 2-4 (model path, tokenizer, hyperparameters) replaced by the local model, its tokenizer and "
            "layerfold's preset values (MERGE_LAYERS=merge_layers, INTERVAL=interval, HIGHEST_LAY=highest_layer or L-1, "
            "LOWEST_LAY=lowest_layer, THRESHOLD=threshold); every other cell runs verbatim in order",
            "on CUDA the tokenizer's tensors are moved to the device (the notebook runs the model where it was loaded)",
            "the notebook's print output is discarded; trials are read by wrapping merge_layers_return_model and "
            "cal_last_hidden_sim (arguments and results recorded, behaviour unchanged)",
        ),
    ),
    "shortgpt": Parity(
        sides={"released": released_shortgpt,
               "layerfold": layerfold_side("shortgpt", ["method=shortgpt"])},
        timed={"released": "official ShortGPT (eval_importance + remove_layers)", "layerfold": "layerfold shortgpt"},
        compare=compare_shortgpt,
        adaptations=COMMON_ADAPTATIONS + (
            "the official class loads float16 with device_map=auto; here the run's dtype (float32 by default)",
            "calibration: the pipeline's token blocks instead of PG19 books; each block is one eval_importance call "
            "(run_shortgpt.py's DataLoader batch 1, stride = block length), through a tokenizer stand-in that returns the block",
        ),
    ),
    "mka": Parity(
        sides={"released": released_mka,
               "layerfold": layerfold_side("mka", MKA_PRESETS["layerfold"]),
               "layerfold_parity": layerfold_side("mka", MKA_PRESETS["layerfold_parity"]),
               "scoring": mka_scoring},
        timed={"released": "released pipeline.py main()", "layerfold": "layerfold mka_code_released",
               "layerfold_parity": "layerfold mka_code_parity"},
        compare=compare_mka,
        adaptations=COMMON_ADAPTATIONS + (
            "pipeline.py main() runs with its own defaults and --num_layer k; --data_dir is the local MMLU copy "
            "(its test split, as the code reads it), --model_path the local checkpoint (from_pretrained returns the loaded model; "
            "the code would pick bfloat16 when supported)",
            "its hard-coded output root /data/yangzhao/... is mapped to a temporary folder; its saved pytorch_model.bin is the result",
            "spies record compute_similarity_matrix_npib_global, compute_fusion_ratios and the tensors layer_fusion assigns "
            "into model.state_dict() (a fresh dict, which is why nothing is written)",
            "on CPU (--mka-memoise) the model forward is memoised: pipeline.py repeats the same forward once per layer index "
            "for every prompt; outputs are identical, CPU wall time is therefore an underestimate",
            "scoring check: pipeline.py's diffusionKernel, load_embeddings (pickles in a temporary folder), "
            "compute_similarity_matrix_npib_global and compute_fusion_ratios run on layerfold's per-sample layer outputs "
            "with the preset's sigma, kernel_alpha, manifold_dim, n_neighbors and k_entropy",
        ),
    ),
    "come": Parity(
        sides={"released": released_come,
               "layerfold": layerfold_side("come", COME_PRESET)},
        timed={"released": "released concat_merge main_func", "layerfold": "layerfold come_code_parity"},
        compare=compare_come,
        adaptations=COME_ADAPTATIONS,
    ),
    "come_p": Parity(
        sides={"released": lambda settings, blocks: released_come(settings, blocks, "come_p"),
               "layerfold": layerfold_side("come_p", COME_P_PRESET)},
        timed={"released": "released concat_merge_P main_func", "layerfold": "layerfold come_p_code_parity"},
        compare=compare_come,
        adaptations=COME_ADAPTATIONS + (
            "--method concat_merge_P with --granularity from the preset (no --psu / --min-max: CoMe-P has none); the model "
            "handler's deep copy per trial copies the stock model inside the hook wrapper",
            "one line of concat_merge_P.py is left out when it is imported (the file itself is untouched): "
            "concat_merge_info[phase_name]['merge_ratio'] = ratio, which reads ratio before the ratio search assigns it and "
            "raises UnboundLocalError on the first step; each step's ratio is read from its trial losses instead (get_loss "
            "wrapped, behaviour unchanged: the first minimum over np.arange(0, 1 + 1/g, 1/g), as the code's min() picks)",
        ),
    ),
    "streamline": Parity(
        sides={"released": released_streamline,
               "layerfold": layerfold_side("streamline", STREAMLINE_PRESET)},
        timed={"released": "released get_cosine_similarity + replace_lightweight_network",
               "layerfold": "layerfold streamline_code_parity (transformer_layer)"},
        compare=compare_streamline,
        adaptations=COMMON_ADAPTATIONS + (
            "get_cosine_similarity reads every calibration block once, in order (generate_unique_index returns 0..n-1; the code "
            "draws cosine_num_data=50 random rows of SlimPajama), each block one 'dataset' row; one empty row is appended "
            "because the code asserts more rows than it reads",
            "its per-window similarities are read by wrapping average_similarity (behaviour unchanged)",
            "the pruned model: init_layer('llama_layer') from the chosen window's first layer, untrained, written by "
            "replace_lightweight_network into AutoModelForCausalLM.from_config(config with L - num_remove layers); the "
            "model name passed is 'llama-<checkpoint>' (the code dispatches on the name)",
        ),
    ),
}
