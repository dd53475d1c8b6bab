"""Command line: flags named as in the reference Wanda/OWL/Mosaic code, so their examples run as is."""

from __future__ import annotations

import argparse
import os
import sys

from mosaic import dist
from mosaic.console import quiet_libraries, quiet_progress
from mosaic.errors import EvaluationError, OptionError

EPILOG = ("examples:\n"
          "  python main.py --prune_method wanda --sparsity_ratio 0.5 --nsamples 32 --seqlen 512"
          " --eval_windows 16 --save runs/wanda50\n"
          "  python main.py --model_name_or_path decapoda-research/llama-7b-hf"
          " --model decapoda-research/llama-7b-hf \\\n"
          "      --Lamda 0.08 --Hyper_m 5 --prune_method sparsegpt_mosaic --sparsity_ratio 0.7"
          " --sparsity_type unstructured --save save_test/\n"
          "  python main.py --config runs/wanda50/config.yaml --save runs/again   # a saved run's options\n"
          "\n"
          "which pipeline for which goal: the \"Choose a pipeline\" table in README.md; every method and "
          "option in detail: docs/\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not a usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_or_none(text: str):
    return None if text.lower() in ("none", "all") else int(text)


def build_parser(prog: str = "main.py") -> argparse.ArgumentParser:
    from mosaic.options import Options

    d = Options()
    p = _Parser(prog=prog,
                description="Prune a LLaMA-family model (Wanda, SparseGPT, OWL, Mosaic) and measure it.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", default=None,
                   help="options from a YAML (.yaml, .yml) or JSON (.json) file, keyed by the flag names "
                        "without -- (model_name_or_path: ...); flags on the command line override it; "
                        "every --save directory holds the config.yaml of its run (default: none)")
    _model_flags(p, d)
    _pruning_flags(p, d)
    _calibration_flags(p, d)
    _recovery_flags(p, d)
    _evaluation_flags(p, d)
    _kv_cache_flags(p, d)
    _output_flags(p, d)
    return p


def _model_flags(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model_name_or_path", dest="model", default=d.model,
                   help="hub id, local HF directory, .gguf file, or the alias smollm2-135m "
                        "(default; offline)")
    g.add_argument("--cache_dir", default=d.cache_dir,
                   help=f"where hub downloads and converted GGUFs go ({d.cache_dir})")
    g.add_argument("--dtype", default=d.dtype,
                   help="auto (default: float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    g.add_argument("--device", default=d.device, help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--device_map", default=None,
                   help="accelerate device map for models larger than one device: auto, or a JSON object "
                        "of module -> device; layers run where they live; a map that offloads layers to "
                        "cpu/disk streams the checkpoint instead, as --offload disk (default: none, one "
                        "device)")
    g.add_argument("--offline", action="store_true", help="never contact the Hugging Face hub (off)")
    g.add_argument("--offload", default=d.offload, choices=("auto", "none", "disk"),
                   help="disk: stream one decoder layer at a time from the safetensors shards to the "
                        "--save_model shards (models larger than memory); auto (default): disk when the "
                        "weights exceed --max_memory; none: always in memory")
    g.add_argument("--max_memory", default=None,
                   help="host memory budget for --offload auto, e.g. 64GB "
                        "(default: 80%% of what is available)")
    g.add_argument("--resume", action="store_true",
                   help="streaming: continue a killed run with the same options from its last finished layer "
                        "(off)")
    g.add_argument("--dist_timeout", type=float, default=d.dist_timeout,
                   help="under torchrun / accelerate launch: seconds a collective waits for the other ranks "
                        f"before the run stops with one line (default: {d.dist_timeout:g})")


def _pruning_flags(p: argparse.ArgumentParser, d) -> None:
    from mosaic.prune import METHODS

    g = p.add_argument_group("pruning")
    g.add_argument("--prune_method", default=d.prune_method,
                   help=f"one of: {', '.join(METHODS)} ({d.prune_method})")
    g.add_argument("--sparsity_ratio", type=float, default=d.sparsity_ratio,
                   help=f"fraction of weights to prune, in [0, 1) ({d.sparsity_ratio:g})")
    g.add_argument("--sparsity_type", default=d.sparsity_type,
                   help="unstructured; N:M (N of every M pruned: 2:4, 4:8); or composite (whole heads and "
                        "MLP channels removed physically, --structured_ratio of the weights, the rest "
                        "unstructured) (default: unstructured)")
    g.add_argument("--structured_ratio", type=float, default=d.structured_ratio,
                   help="composite: share of decoder projection weights removed as whole heads/channels "
                        f"(≤ S) ({d.structured_ratio:g})")
    g.add_argument("--round_to", type=int, default=d.round_to,
                   help=f"composite: kept MLP widths are multiples of this ({d.round_to})")
    g.add_argument("--uniform_widths", action="store_true",
                   help="composite: the same widths in every layer, so the checkpoint is a plain family "
                        "config (off)")
    g.add_argument("--allocation", default=None,
                   help="uniform, owl, mosaic, mosaic_ref or search (default: implied by the method name)")
    g.add_argument("--allocation_file", default=None,
                   help="JSON sparsity map (composite: with the kept heads and channels per layer): "
                        "written after profiling; if it exists, applied instead of profiling (default: none)")
    g.add_argument("--search_windows", type=int, default=d.search_windows,
                   help="allocation search: windows for the Fisher, and as many held-out ones that score "
                        f"allocations ({d.search_windows})")
    g.add_argument("--search_budget", type=int, default=d.search_budget,
                   help="allocation search: generations of evolutionary refinement by true KL, ~25 s each "
                        f"for SmolLM2 on 2 CPU cores ({d.search_budget}; 0: the curve solve only)")
    g.add_argument("--Hyper_m", type=float, default=None,
                   help="outlier threshold M: scores above M × mean (default: 5; 6 for wanda_owl_structure, "
                        "as OWL's N:M)")
    g.add_argument("--Lamda", type=float, default=None,
                   help="allocation half-range λ (default: 0.08; 2 for wanda_owl_structure, as OWL's "
                        "N:M)")
    g.add_argument("--blocksize", type=int, default=d.blocksize,
                   help=f"SparseGPT column block ({d.blocksize})")
    g.add_argument("--percdamp", type=float, default=d.percdamp,
                   help=f"SparseGPT and ALPS damping, fraction of mean diag(H) ({d.percdamp:g})")
    g.add_argument("--alps_rho0", type=float, default=d.alps_rho0,
                   help=f"ALPS: initial ADMM penalty ρ ({d.alps_rho0:g})")
    g.add_argument("--alps_max_iter", type=int, default=d.alps_max_iter,
                   help=f"ALPS: ADMM iteration cap ({d.alps_max_iter})")
    g.add_argument("--alps_cg_iters", type=int, default=d.alps_cg_iters,
                   help=f"ALPS: conjugate-gradient iterations on the final support ({d.alps_cg_iters})")


def _calibration_flags(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib_dataset", default=d.calib_dataset,
                   help="wiki-offline, exams, code (offline), c4, wikitext2, or a .txt/.jsonl/.json path "
                        "(records with 'text', or chat records with 'messages', rendered by the model's chat "
                        "template); or a weighted mixture NAME:WEIGHT,NAME:WEIGHT, each text giving windows "
                        f"in proportion to its weight ({d.calib_dataset})")
    g.add_argument("--calib_stats", default=d.calib_stats,
                   help="statistics every method prunes from: sequential (default, as the reference pruning "
                        "pass: each layer sees the outputs of the already-pruned layers before it) or dense "
                        "(the dense model's activations, as the allocation's profiling pass; Wanda then "
                        "needs no second pass)")
    g.add_argument("--nsamples", type=int, default=d.nsamples, help=f"calibration windows ({d.nsamples})")
    g.add_argument("--seqlen", type=int, default=d.seqlen,
                   help=f"tokens per calibration window, capped at the context ({d.seqlen})")
    g.add_argument("--seed", type=int, default=d.seed,
                   help=f"which calibration windows are drawn, and the search's and recovery's random draws "
                        f"({d.seed})")
    g.add_argument("--calib_batch_size", type=int, default=d.calib_batch_size,
                   help=f"windows per forward ({d.calib_batch_size})")
    g.add_argument("--calib_dtype", default=d.calib_dtype,
                   help="precision of calibration forwards: auto (the model's dtype, so that every machine "
                        "builds the same model), float32, bfloat16 (faster on CPUs with native bf16, but "
                        "another model), float16; weights and statistics stay fp32 (auto)")
    g.add_argument("--true_sequential", dest="true_sequential", action="store_true",
                   default=d.true_sequential,
                   help="statistics of each projection group after pruning the earlier groups of the layer "
                        "(q,k,v → o → gate,up → down), in one forward per layer; --no_true_sequential: "
                        "the reference code's two-pass loop (default)")
    g.add_argument("--no_true_sequential", "--no-true_sequential", dest="true_sequential",
                   action="store_false",
                   help="the reference code's two-pass loop (off: --true_sequential is the default)")


def _recovery_flags(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("recovery (mask kept: zeros stay zeros)")
    g.add_argument("--reconstruct", default=d.reconstruct, choices=("none", "layer", "sublayer"),
                   help="after each layer is pruned, tune its kept weights so that its output matches the "
                        "dense layer's: the whole layer at once, or attention and MLP separately (none)")
    g.add_argument("--reconstruct_steps", type=int, default=d.reconstruct_steps,
                   help=f"Adam steps per layer (or per half, sublayer) ({d.reconstruct_steps})")
    g.add_argument("--reconstruct_lr", type=float, default=d.reconstruct_lr,
                   help=f"reconstruction learning rate ({d.reconstruct_lr:g})")
    g.add_argument("--reconstruct_batch", type=int, default=d.reconstruct_batch,
                   help=f"calibration windows per reconstruction step ({d.reconstruct_batch})")
    g.add_argument("--reconstruct_norms", action="store_true", default=d.reconstruct_norms,
                   help="also tune each layer's two RMSNorm scales and its projections' biases, which no "
                        "mask covers (off)")
    g.add_argument("--recovery_guard", default=d.recovery_guard,
                   help="texts recovery should not make worse: each gets held-out windows; each tuned "
                        "layer keeps the share (0, 1/2, 1) of its tuning that raises none of their NLLs "
                        "(scored through the rest of the model; a per-layer check, not a bound on the "
                        "finished model), and distillation keeps no state worse on any; auto: the "
                        "calibration texts plus code and exam questions, or NAME,NAME,... (none)")
    g.add_argument("--distill_steps", type=int, default=d.distill_steps,
                   help="end-to-end distillation steps from the dense model after pruning (0: none)")
    g.add_argument("--distill_lr", type=float, default=d.distill_lr,
                   help=f"AdamW peak learning rate ({d.distill_lr:g})")
    g.add_argument("--distill_batch", type=int, default=d.distill_batch,
                   help=f"windows per distillation step, accumulated one at a time ({d.distill_batch})")
    g.add_argument("--distill_windows", type=int, default=d.distill_windows,
                   help=f"calibration windows to distil on, none used for statistics; 1/8 as many more are "
                        f"held out to keep the best state ({d.distill_windows})")
    g.add_argument("--distill_device", default=d.distill_device, choices=("auto", "cpu"),
                   help="where distillation runs: auto (the GPU when student, teacher and optimizer state "
                        "fit there, else refused in one line), or cpu (the host, slow) (auto)")
    g.add_argument("--distill_dataset", default=d.distill_dataset,
                   help="another text or weighted mixture (as --calib_dataset) to distil on (default: the "
                        "calibration text)")


def _evaluation_flags(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_datasets", default=d.eval_datasets,
                   help=f"comma list: wiki-offline, suite (the offline suite: wiki-heldout, science, exams, "
                        f"code), wikitext2, ptb (test), ptb-val, c4, or files; none to skip "
                        f"({d.eval_datasets})")
    g.add_argument("--eval_windows", type=_int_or_none, default=None,
                   help="at most this many windows (default all)")
    g.add_argument("--eval_seqlen", type=int, default=d.eval_seqlen,
                   help=f"tokens per perplexity window ({d.eval_seqlen})")
    g.add_argument("--eval_batch_size", type=int, default=d.eval_batch_size,
                   help=f"perplexity windows per forward ({d.eval_batch_size})")
    g.add_argument("--eval_dtype", default=d.eval_dtype,
                   help="dtype of the evaluation forwards: model (default) or float32/bfloat16/float16 "
                        "(a per-layer copy)")

    g.add_argument("--eval_zero_shot", nargs="?", const="all", default=None, metavar="TASKS",
                   help="lm-eval zero-shot accuracy: a comma list, or all (default when the flag is bare) = "
                        "boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa; piqa also "
                        "offline (default: no zero-shot)")
    g.add_argument("--zs_limit", type=_int_or_none, default=None,
                   help="at most N items per zero-shot task (default: all)")
    g.add_argument("--zs_batch_size", type=int, default=d.zs_batch_size,
                   help=f"lm-eval batch size, set on HFLM ({d.zs_batch_size})")


def _kv_cache_flags(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("KV-cache sparsity (Mustafar), applied to --eval_datasets and --eval_zero_shot")
    g.add_argument("--kv_sparsity", type=float, default=None,
                   help="prune this fraction of every key and value vector once its token leaves the dense "
                        "window (default: none, the cache stays dense)")
    g.add_argument("--k_sparsity", type=float, default=None,
                   help="keys only, overriding --kv_sparsity for K (default: --kv_sparsity)")
    g.add_argument("--v_sparsity", type=float, default=None,
                   help="values only, overriding --kv_sparsity for V (default: --kv_sparsity)")
    g.add_argument("--kv_window", type=int, default=d.kv_window,
                   help=f"most recent tokens kept dense ({d.kv_window})")
    g.add_argument("--kv_method", default=d.kv_method,
                   help="per_token (magnitude within each head vector, default) or per_channel")
    g.add_argument("--kv_reference", action="store_true",
                   help="per_token as the official code counts it, which prunes one entry fewer at most "
                        "ratios (off)")
    g.add_argument("--kv_allocation", default=d.kv_allocation,
                   help="uniform (default: every vector alike), layer (one K and one V sparsity per "
                        "layer) or head (per KV head), chosen from a sensitivity measured on calibration "
                        "text so that the overall K and V sparsity equal the targets")
    g.add_argument("--kv_allocation_file", default=None,
                   help="JSON map of per-layer (per-head) K/V sparsities: written after the sensitivity; "
                        "if it exists, applied instead of measuring (default: none)")


def _output_flags(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--save", default=None,
                   help="directory for results.json, summary.txt, config.yaml (this run's options, for "
                        "--config) and plots (default: none, nothing saved)")
    g.add_argument("--save_model", default=None,
                   help="directory for the pruned checkpoint, safetensors (default: none, not saved)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing --save / --save_model directories (off)")


class _FromFile:
    """A default taken from --config: not text, so that argparse passes it on unconverted (the options'
    own checks then refuse a value of the wrong type, naming the option, as for the Python API)."""

    def __init__(self, value):
        self.value = value


def parse_options(argv: list[str] | None = None, prog: str = "main.py"):
    """Options from the command line, over those of a --config file; a file's options are named in
    ``extra["config"]`` (so that an error in one says where it came from)."""
    from mosaic.options import Options

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    path = args.config
    if path is not None:
        parser.set_defaults(**{k: _FromFile(v) for k, v in config_values(parser, path).items()})
        args = parser.parse_args(argv)
    values = vars(args)
    del values["config"]
    used = sorted(k for k, v in values.items() if isinstance(v, _FromFile))
    for option in used:
        values[option] = file_value(parser, option, values[option].value, path)
    opts = Options(**values)
    opts.extra["argv"] = [prog, *(sys.argv[1:] if argv is None else argv)]
    if path is not None:
        opts.extra["config"] = {"path": path, "options": used}
    return opts


def config_values(parser: argparse.ArgumentParser, path: str) -> dict:
    """The options of a --config file by ``Options`` field; a file that cannot be read, or a key that names
    no option, is a usage error (one line, exit 2)."""
    import dataclasses

    from mosaic import runconfig
    from mosaic.options import Options

    known = [f.name for f in dataclasses.fields(Options) if f.name != "extra"]
    try:
        return runconfig.options(runconfig.load(path), known)
    except runconfig.ConfigError as e:
        parser.error(f"--config {path}: {e}")


def file_value(parser: argparse.ArgumentParser, option: str, value, path: str):
    """A --config value as the option takes it: text where the option is text (a YAML mapping for
    --device_map as its JSON), none/all for --eval_windows and --zs_limit as on the command line; numbers
    and booleans as they are, for ``options.check_types``. Null only where the option's default is."""
    import dataclasses
    import json

    from mosaic.options import Options

    kind = {f.name: f.type for f in dataclasses.fields(Options)}[option]
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    where = f" (from --config {path})"
    if value is None:
        if "None" not in kind:
            raise OptionError(option, f"cannot be null; leave it out for the default{where}")
        return None
    if option == "device_map" and isinstance(value, dict):
        return json.dumps(value)
    if kind.startswith("str") and not isinstance(value, str):
        raise OptionError(option, f"must be text, got {value!r}{where}")
    action = next((a for a in parser._actions if a.dest == option), None)
    if action is not None and action.type is _int_or_none and isinstance(value, str) \
            and value.lower() in ("none", "all"):
        return None
    return value


def config_origin(err: OptionError, opts) -> str:
    """" (from --config FILE)" when the option that failed came from that file, else nothing."""
    config = getattr(opts, "extra", {}).get("config") or {}
    if err.option in config.get("options", ()) and "--config" not in err.message:
        return f" (from --config {config['path']})"
    return ""


def flag(option: str) -> str:
    """The flag of an ``Options`` field: the fields are named as the flags."""
    return f"--{option}"


def describe(err: BaseException) -> str:
    """One line for an error: the flag and message of an OptionError, else the type and first line."""
    if isinstance(err, OptionError):
        return f"{flag(err.option)}: {err.message}"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run, and turn library errors into one line each: bad input exits 2 with nothing written; a failed or
    interrupted evaluation exits 1 (130 for Ctrl-C) with the pruned model already saved."""
    prog = prog or os.path.basename(sys.argv[0]) or "mosaic"
    rank = int(os.environ.get("RANK", "0"))
    if rank:  # only rank 0 shows progress and logs; the others speak when they fail
        quiet_progress()
    quiet_libraries(rank)
    if rank:
        prog = f"{prog} (rank {rank})"
    opts = None
    try:
        from mosaic.pipeline import run

        opts = parse_options(argv, prog)
        dist.init_from_env(opts.dist_timeout)
        try:
            run(opts)
        finally:
            dist.close()
    except OptionError as e:
        if not rank:  # every rank checks the same options: one line is enough
            print(f"{prog}: error: {describe(e)}{config_origin(e, opts)}", file=sys.stderr)
        return 2
    except EvaluationError as e:
        if rank:
            return 130 if e.status == "interrupted" else 1
        why = describe(e.cause)
        where = " and ".join(e.saved) if e.saved else "nowhere (no --save or --save_model was given)"
        what = "interrupted" if e.status == "interrupted" else f"failed ({why})"
        print(f"{prog}: error: evaluation {what}; the pruned run is saved in {where}, with the results of "
              "what finished", file=sys.stderr)
        return 130 if e.status == "interrupted" else 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except dist.RankFailure as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file that cannot be read or written (a full disk): what was finished stays
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return 1
    except MemoryError as e:  # torch.OutOfMemoryError (a device out of memory) is a RuntimeError
        print(f"{prog}: error: {out_of_memory(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":
            raise
        print(f"{prog}: error: {out_of_memory(e)}", file=sys.stderr)
        return 1
    return 0


def out_of_memory(err: BaseException) -> str:
    """One line for running out of (device or host) memory, naming the knobs that lower the need."""
    where = "the device" if type(err).__name__ == "OutOfMemoryError" else "host memory"
    return (f"out of memory on {where}; lower --calib_batch_size or --nsamples, or stream the model one "
            "layer at a time with --offload disk (see --max_memory)")
