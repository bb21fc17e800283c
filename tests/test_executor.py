

# ------------------------------------------------------------------------------------------------ CLI, imports


def test_local_runs_never_import_ray() -> None:
    import subprocess
    import sys

    code = ("import sys, quant.cli, quant.executor, quant.calib.sharded, quant.eval.sharded, quant.pipeline; "
            "from quant.cli.executor_options import executor_from_args; import argparse; "
            "assert executor_from_args(argparse.Namespace(executor='local', ray_address=None)) is None; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_commands_take_the_executor_options() -> None:
    import argparse

    from quant.cli import calibrate as cli_calibrate, evaluate as cli_evaluate, run as cli_run
    from quant.cli.executor_options import executor_changes, executor_from_args

    parser = argparse.ArgumentParser(prog="quant")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (cli_calibrate, cli_evaluate, cli_run):
        module.register(subparsers)
    args = parser.parse_args(["calibrate", "m.onnx", "--executor", "ray", "--ray-address", "auto"])
    executor = executor_from_args(args)
    assert isinstance(executor, RayExecutor) and executor.address == "auto"
    args = parser.parse_args(["evaluate", "dpcrn", "m.onnx"])
    assert args.executor == "local" and executor_from_args(args) is None
    args = parser.parse_args(["run", "--quick", "--executor", "ray"])
    assert executor_changes(args) == {"executor": "ray", "ray_address": None}
    with pytest.raises(Exception, match="--ray-address needs --executor ray"):
        executor_changes(parser.parse_args(["run", "--ray-address", "auto"]))
