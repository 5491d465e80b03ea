"""Parity with the papers' released code (research tooling: layerfold never imports this package).

Run it and layerfold's parity mode on the same model and data.

For each method whose released implementation runs on a Hugging Face Llama on one device, this runs
the released code (unmodified, from a directory outside this repository) and layerfold's parity
preset on the same checkpoint, dtype, device and calibration data, then compares what they chose
and the weights they produced, tensor by tensor, and times both side by side (wall seconds, peak
GPU memory, peak host RSS; each implementation in its own process, so the high-water marks are its own).

    python -m parity fetch [--git-dir yangyifei729/LaCo=/path/to/its/git ...]  # else git clone
    python -m parity run --blocks 32 --seq-len 128 --threads 1 --repeats 2   # CPU (results/parity/)
    python -m parity run --device cuda --out results/parity/gpu              # GPU, pipeline-size calibration
    python -m parity summary --out results/parity                            # rewrite summary.md

``run`` fetches what is missing first (network clone of the pinned commit; without network, ``fetch
--git-dir`` from a local copy, or ``--released-dir`` pointing at a folder that already has it).

| method   | released code (pinned commit)                       | layerfold side                               |
|----------|-----------------------------------------------------|----------------------------------------------|
| laco     | yangyifei729/LaCo ``laco_llama-13b.ipynb`` cells     | ``+experiment=laco_code_parity``             |
| shortgpt | icip-cas/ShortGPT ``shortgpt/shortgpt.py``           | ``method=shortgpt``                          |
| mka      | SempraETY/Pruning-via-Merging ``pipeline.py`` main() | ``+experiment=mka_code_released`` (its output) and ``mka_code_parity`` (its intent) |
| come     | WangFei-2019/CoMe ``methods/concat_merge.py`` main_func | ``+experiment=come_code_parity``          |
| come_p   | WangFei-2019/CoMe ``methods/concat_merge_P.py`` main_func | ``+experiment=come_p_code_parity``      |
| streamline | RUCKBReasoning/LLM-Streamline ``get_cosine.py`` + ``train_mseloss.replace_lightweight_network`` | ``+experiment=streamline_code_parity`` |

LLM-Streamline is checked up to training: its window selection (``get_cosine_similarity``) and the
pruned model it writes around the (untrained) replacement layer initialised from the window's first
layer, against ``method=streamline`` with ``replacement=transformer_layer``; its training is the
recovery engine's (departures in ``docs/recovery.md``). SLEB is not checked here.

**Adapting the released code, never editing it.** Only input/output is changed, by monkeypatching or a
thin driver, and every adaptation is recorded in the result JSON (``adaptations``):

- models come from the local checkpoint in the run's dtype and device (the released code loads from
  the hub, in float16/bfloat16/float32 as each chose, with ``device_map="auto"``);
- calibration is layerfold's token blocks (the same tensor for both sides), handed over where the
  released code reads its dataset; MKA keeps its own MMLU-test calibration, read from the local files;
- hard-coded ``.cuda()``/``.to("cuda")`` go to the run device on a machine without CUDA, and
  hard-coded output paths go to a temporary folder; CoMe's checkpoint write is skipped (layerfold's
  side writes none either), MKA's ``torch.save`` of its state dict is kept because it is its result;
- on CPU, MKA's ``L`` identical forward passes per prompt are memoised (same outputs, a fraction of
  the time; ``--mka-memoise``), which makes its CPU timing an underestimate;
- CoMe's patched modeling file (transformers ~4.45) does not build under this transformers; its
  extra outputs (``heads_embed``, ``mlp_embed``) are produced by hooks that call the file's own
  ``L1_Correlation`` on the stock model's ``o_proj``/``down_proj`` inputs, reshaped as the file does.

Every comparison has a tolerance and a verdict; those marked ``gate: false`` record a documented,
Layout: ``released`` (the pinned repositories and fetching them), ``compare`` (comparisons with a tolerance
and a verdict), ``runner`` (settings, model, calibration, measurement, the helpers around released code),
one adapter per released codebase (``laco``, ``shortgpt``, ``mka``, ``come``, ``streamline``; ``replaceme``
and ``linear_patch`` with ``adapters_2025``), ``registry`` (the two sides of each seed method),
``orchestrate`` (one process per side, results, summary). ReplaceMe and LinearPatch:
``python -m parity.methods_2025 fetch|run``.
"""
