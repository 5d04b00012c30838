"""The `bertrt` command line: a thin click layer over the Python API.

User mistakes (bad files, bad fields, bad input) print one line, `error: ...`, and exit with
code 2; no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path

import click

from bertrt.config import PRESETS
from bertrt.errors import BertrtError, user_errors
from bertrt.fileio import atomic_write_text


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bertrt")
def main() -> None:
    """bertrt: train, export, inspect and benchmark BERT models."""


@main.command()
@click.argument("target", required=False)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help="Inspect a preset size.")
@click.option("--head", default=None,
              help="none | pretraining | classification | token-classification | "
                   "question-answering.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--seq", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--fused", "pipeline", is_flag=False, flag_value="all", default=None,
              type=click.Choice(["all", "ort", "torch"]),
              help="Show the graph after a fusion pipeline (default when given: all), and "
                   "every near-match a fusion refused, one line each: the node and why.")
@click.option("--listing", is_flag=True, help="Print the full graph listing too.")
@click.option("--dot", "dot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the graph as Graphviz DOT to this file.")
@user_errors
def inspect(target: str | None, preset: str | None, head: str | None, batch: int, seq: int,
            pipeline: str | None, listing: bool, dot_path: Path | None) -> None:
    """Show a model's graph: per-node shapes, parameters, FLOPs and bytes, with totals.

    TARGET is a Hugging Face-layout model dir or an exported .onnx file; or use --preset NAME.
    """
    from bertrt.config import BertConfig
    from bertrt.graph.bert import build_bert
    from bertrt.graph.passes import fused_copy
    from bertrt.model import Model

    if (target is None) == (preset is None):
        raise click.UsageError("give a model dir or --preset NAME (exactly one)")
    if dot_path is not None and not dot_path.parent.is_dir():
        raise BertrtError(f"{dot_path}: folder {dot_path.parent} does not exist")
    if preset is not None:
        config = BertConfig.preset(preset)
        graph = build_bert(config, head)
        title = f"preset {preset}"
    else:
        path = Path(target)  # type: ignore[arg-type]
        if path.suffix == ".onnx":
            from bertrt.serve.cli import inspect_onnx

            click.echo(inspect_onnx(path))
            return
        model = Model.load(path, head=head)
        config, graph = model.config, model.graph
        title = f"{path} ({model.head} head)"
    if config.max_position_embeddings < seq:
        raise BertrtError(f"--seq {seq} exceeds max_position_embeddings="
                          f"{config.max_position_embeddings}")
    refused: list[str] = []
    if pipeline is not None:
        graph, result = fused_copy(graph, pipeline)
        counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
        title += f", {pipeline} pipeline: {counts}"
        refused = result.refused
    click.echo(f"{title}: layers={config.num_hidden_layers} hidden={config.hidden_size} "
               f"heads={config.num_attention_heads} intermediate={config.intermediate_size} "
               f"vocab={config.vocab_size} act={config.hidden_act}")
    if listing:
        click.echo(str(graph))
    click.echo(graph.summary(batch=batch, seq=seq))
    if pipeline is not None:
        click.echo(f"refused: {len(refused)}" + "".join(f"\n  {line}" for line in refused))
    if dot_path is not None:
        atomic_write_text(dot_path, graph.to_dot())
        click.echo(f"wrote {dot_path}")


@main.command()
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "model_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Hugging Face-layout model dir (config.json + model.safetensors).")
@click.option("--flavour", type=click.Choice(["ort", "standard"]), default=None,
              help="ort: ONNX Runtime's fused com.microsoft ops; standard: core ONNX only "
                   "[default: ort; standard with --int8].")
@click.option("--fp16", is_flag=True, help="fp16 weights and compute.")
@click.option("--no-fuse", is_flag=True, help="Export the graph as built, without fusions.")
@click.option("--head", type=click.Choice(["none", "pretraining", "classification",
                                           "token-classification", "question-answering"]),
              default=None, help="Head to export (default: the model's own).")
@click.option("--opset", type=click.IntRange(min=1), default=None, help="ONNX opset.")
@click.option("--packed", is_flag=True,
              help="Padding-free: inputs input_ids, token_type_ids (tokens,) and cu_seqlens "
                   "(batch+1,) int32; per-token outputs (tokens, ...).")
@click.option("--int8", is_flag=True,
              help="Dynamic int8 weight products for CPU (FFN down-projections, attention core, "
                   "LayerNorms and embeddings stay fp32).")
@click.option("--any-padding", is_flag=True,
              help="Exact for left padding and masks with holes (ort flavour reads the raw "
                   "mask; default assumes right padding, as the tokenizer pads, and is faster).")
@user_errors
def export(output: Path, model_dir: Path, flavour: str, fp16: bool, no_fuse: bool,
           head: str | None, opset: int | None, packed: bool, int8: bool,
           any_padding: bool) -> None:
    """Export a model dir to OUTPUT (.onnx) for ONNX Runtime or any ONNX runtime."""
    from bertrt.model import Model

    if not output.parent.is_dir():
        raise BertrtError(f"{output}: folder {output.parent} does not exist")
    model = Model.load(model_dir)
    path = model.export_onnx(output, flavour=flavour, fp16=fp16, opset=opset, head=head,
                             fuse=not no_fuse, padding="any" if any_padding else "right",
                             packed=packed, int8=int8)
    size = path.stat().st_size / 1e6
    extras = "".join(f", {name}" for name, on in (("fp16", fp16), ("int8", int8),
                                                   ("packed", packed)) if on)
    flavour = flavour or ("standard" if int8 else "ort")
    click.echo(f"wrote {path} ({size:.1f} MB, flavour {flavour}{extras}, "
               f"head {head or model.head})")


@main.command()
@click.argument("corpus", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write vocab.txt.")
@click.option("--size", default=30522, show_default=True, type=click.IntRange(min=10),
              help="Vocabulary size, specials included.")
@click.option("--cased", is_flag=True, help="Keep case and accents (default: lower-case).")
@click.option("--min-frequency", default=2, show_default=True, type=click.IntRange(min=1))
@user_errors
def vocab(corpus: tuple[Path, ...], output: Path, size: int, cased: bool,
          min_frequency: int) -> None:
    """Train a WordPiece vocabulary on text files (one sentence or document per line)."""
    from bertrt.tokenizer import train_vocab

    if not output.parent.is_dir():
        raise BertrtError(f"{output}: folder {output.parent} does not exist")
    tok = train_vocab(list(corpus), size=size, lowercase=not cased, min_frequency=min_frequency)
    tok.save_vocab(output)
    click.echo(f"wrote {output}: {tok.vocab_size} tokens")


def _register_subcommands() -> None:
    """Commands whose code lives with its layer: training and serving."""
    from bertrt.serve.cli import serve_bench
    from bertrt.serve.commands import embed, predict
    from bertrt.serve.evaluate import evaluate
    from bertrt.serve.http.cli import serve
    from bertrt.train.cli import train

    main.add_command(train)
    main.add_command(serve_bench)
    main.add_command(embed)
    main.add_command(predict)
    main.add_command(serve)
    main.add_command(evaluate)


_register_subcommands()


if __name__ == "__main__":  # pragma: no cover
    main()
