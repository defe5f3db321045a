"""The ``ldmflow`` command line: one subcommand per stage, each a thin call of its flow.

Every subcommand takes ``--config FILE`` (YAML; a stage reads its own section) and flags
that override single fields. Heavy imports (Prefect, torch) happen inside the commands,
after the state folder is configured, so ``--help`` is quick.
"""

from __future__ import annotations

import sys
import traceback
from typing import Annotated, Optional

import typer

from ldmflow.flows import cli_data, cli_models, runtime
from ldmflow.flows.cli_options import ConfigOption, expected_cause, fail

app = typer.Typer(
    name="ldmflow",
    help="Train and serve latent diffusion models: shard images, precompute latents, train, register, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal's width
)


@app.callback()
def global_options(
    state_dir: Annotated[
        Optional[str],
        typer.Option(help="Local state folder for the embedded services (default: $LDMFLOW_HOME or .ldmflow)."),
    ] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show Prefect's and MLflow's own logs, and the traceback of a failure.")] = False,
) -> None:
    runtime.configure(state_dir, verbose)


def run_pipeline(
    config: ConfigOption = None,
    force: Annotated[Optional[list[str]], typer.Option("--force", help="Rerun this stage even if it is done (repeatable).")] = None,
    stage: Annotated[Optional[list[str]], typer.Option("--stage", help="Run only these stages (repeatable); the others must be done.")] = None,
    serve: Annotated[bool, typer.Option("--serve", help="Then serve the production model until interrupted.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress: each stage as it starts, training lines, bars.")] = True,
) -> None:
    """Run everything: shard → autoencoder → precompute → train → evaluate → promote (→ serve).

    Each stage is skipped when its inputs and config are unchanged since it last finished
    (a record under STORAGE/NAME/_stages/), so a rerun after a failure resumes at the failed
    stage, and training resumes from its checkpoint. Stages: shard, autoencoder, precompute,
    train, evaluate, promote, serve. Endpoints come from pipeline.endpoints in the config or
    from AWS_ENDPOINT_URL, RAY_ADDRESS, PREFECT_API_URL and MLFLOW_TRACKING_URI.
    """
    from ldmflow import configs
    from ldmflow.flows.settings import STAGES, load_endpoints

    for option, names in (("--force", force or []), ("--stage", stage or [])):  # usage errors before any server starts
        unknown = sorted(set(names) - set(STAGES))
        if unknown:
            raise typer.BadParameter(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}",
                                     param_hint=option)
    try:
        load_endpoints(config).apply()  # before Prefect is imported
    except configs.ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    runtime.prefect_api()  # before Prefect is imported
    from ldmflow.flows import pipeline, stage_runner

    stages = list(stage or [])
    if serve:
        stages = [*(stages or load_spec_stages(config)), "serve"]
    try:
        outcome = pipeline.run(config, force=list(force or []), stages=stages or None, progress=progress)
    except configs.ConfigError as exc:
        raise fail(exc, 2) from exc
    except stage_runner.StageNotRun as exc:
        raise fail(exc) from exc
    typer.echo(outcome.summary())
    if serve:
        cli_models.wait_then_stop_serve()


def load_spec_stages(config: str | None) -> list[str]:
    from ldmflow import configs
    from ldmflow.flows.settings import PipelineConfig

    return list(configs.load(PipelineConfig, config, section="pipeline").stages)


def deploy_flows(
    file: Annotated[str, typer.Option("--file", help="Prefect deployments file.")] = "prefect.yaml",
    name: Annotated[Optional[list[str]], typer.Option("--name", help="Only this deployment (repeatable).")] = None,
) -> None:
    """Register the scheduled deployments of prefect.yaml with the Prefect server.

    The server is PREFECT_API_URL (or Prefect's profile); work pools named by the
    deployments are created when missing. Workers then run them:
    prefect worker start --pool ldmflow-cpu (and ldmflow-gpu on GPU nodes).
    """
    from ldmflow.flows import deploy

    try:
        deployed = deploy.deploy(file, names=list(name or []))
    except deploy.DeployError as exc:
        raise fail(exc) from exc
    for line in deployed:
        typer.echo(f"deploy: {line}")


def config_reference() -> None:
    """Print the configuration reference (docs/configuration.md), generated from the stage
    configs: every field with its type, default, bounds, meaning, and whether it is part of
    the stage's identity."""
    from ldmflow.flows.reference import page

    typer.echo(page(), nl=False)


# Every subcommand, in the order --help lists them.
for name, command in [
    ("shard", cli_data.shard_images),
    ("train-autoencoder", cli_data.train_autoencoder),
    ("precompute", cli_data.precompute),
    ("train", cli_data.train),
    ("inspect", cli_data.inspect),
    ("evaluate", cli_models.evaluate),
    ("promote", cli_models.promote),
    ("rollback", cli_models.rollback),
    ("export", cli_models.export_model),
    ("sample", cli_models.sample),
    ("serve", cli_models.serve_model),
    ("pipeline", run_pipeline),
    ("deploy", deploy_flows),
    ("config-reference", config_reference),
]:
    app.command(name)(command)


def main() -> None:
    """The ``ldmflow`` console script: the app, with every failure a user can act on printed
    as one line, ``error: …``, and a non-zero exit: a usage error (2) names its flag or
    config field; a failure of the input or the setting (1) is said once, wherever it was
    raised, with its traceback only under ``-v``. Anything else is a bug and keeps its
    traceback."""
    click = sys.modules[typer.BadParameter.__module__]  # the click Typer runs on (its own copy, lately)

    try:
        code = app(standalone_mode=False)
    except click.NoArgsIsHelpError as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
        typer.echo(f"error: {exc.format_message()}{where}", err=True)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        typer.echo("error: interrupted", err=True)
        raise SystemExit(130) from None
    except Exception as exc:
        cause = expected_cause(exc)
        if cause is None:
            raise
        if runtime.verbose():
            traceback.print_exception(exc)
        typer.echo(f"error: {cause}", err=True)
        raise SystemExit(cause.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

