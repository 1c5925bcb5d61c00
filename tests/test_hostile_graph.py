"""A ``.pt2`` graph that writes files: every node is vetted before the graph runs.

The attack (no pickle, no Python code in the archive): a ``torch.export`` graph whose first node is
``aten.from_file(PATH, shared=True, size=4)`` and whose next node fills that tensor in place; run,
it overwrites the first bytes of any file the user can write. Each command that runs a model must
refuse it in one line naming the operator, and the victim file keeps its bytes and its mode.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ddpmcli.checkpoints import opvet  # noqa: E402
from ddpmcli.errors import CheckpointError  # noqa: E402

META = {"schedule": {"kind": "linear", "T": 10}, "data_shape": [2], "prediction_type": "epsilon"}
VICTIM_BYTES = b"hello world"


def _export_writer(victim: Path, out: Path) -> None:
    """Export a 2-D denoiser whose graph maps ``victim`` with ``from_file`` and fills it with 'C'.

    ``aten.from_file`` has no meta kernel, so export cannot trace it as is; an attacker registers
    one for the trace (as here, removed again afterwards): the saved archive needs nothing of it.
    """
    lib = torch.library.Library("aten", "IMPL")

    def meta_from_file(
        filename: str, shared: bool | None = None, size: int = 0, **kw: object
    ) -> torch.Tensor:
        return torch.empty(size, dtype=kw.get("dtype") or torch.float32, device="meta")

    lib.impl("from_file", meta_from_file, "Meta")
    path = str(victim)

    class Writer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            f = torch.ops.aten.from_file.default(path, True, 4, dtype=torch.uint8)
            f.fill_(67)
            return self.lin(x) + 0 * f.sum().float()

    try:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(
            Writer(),
            (torch.randn(4, 2), torch.zeros(4, dtype=torch.long)),
            dynamic_shapes=({0: batch}, {0: batch}),
        )
        torch.export.save(program, str(out), extra_files={"ddpm.json": json.dumps(META)})
    finally:
        lib._destroy()


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("graph")
    victim = root / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    victim.chmod(0o600)
    _export_writer(victim, root / "writer.pt2")
    return root / "writer.pt2", victim


def _assert_untouched(victim: Path) -> None:
    assert victim.read_bytes() == VICTIM_BYTES
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "command",
    [
        ("reconstruct", "--data", "moons", "-n", "4", "--t", "5"),
        ("sample", "--n", "4", "--steps", "3"),
        ("nll", "--data", "moons", "-n", "4"),
    ],
    ids=["reconstruct", "sample", "nll"],
)
def test_a_graph_that_maps_a_file_is_refused(cli, writer, command) -> None:  # type: ignore[no-untyped-def]
    archive, victim = writer
    result = cli(command[0], str(archive), *command[1:])
    _assert_untouched(victim)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "operator torch.ops.aten.from_file.default is not a pure tensor operator" in lines[0]
    assert result.stdout == ""


def test_the_deserialized_graph_is_vetted_too(writer) -> None:  # type: ignore[no-untyped-def]
    """The second check (on the graph torch built) refuses the same node by itself."""
    archive, victim = writer
    from ddpmcli.checkpoints.programs import _no_unsafe_unpickling

    with _no_unsafe_unpickling():
        program = torch.export.load(str(archive))
    with pytest.raises(CheckpointError, match=r"operator aten\.from_file\.default is not a pure"):
        opvet.vet_graph_module(program.graph_module, "w.pt2")
    _assert_untouched(victim)


def test_a_renamed_target_in_the_json_is_refused(tmp_path: Path, writer) -> None:  # type: ignore[no-untyped-def]
    """Targets torch would resolve by name (``torch.save``, a custom namespace, a higher-order
    operator, a bad name) are refused before torch reads the graph."""
    from ddpmcli.checkpoints.programs import scan_pt2

    archive, _ = writer
    for target, reason in [
        ("torch.save", "unknown or not an aten operator"),
        ("torch.ops.mylib.evil.default", "unknown or not an aten operator"),
        ("torch.ops.higher_order.cond", "unknown or not an aten operator"),
        ("torch.ops.aten.save.default", "reaches files"),
        ("torch.ops.aten.set_.source_Tensor", "reaches files"),
        ("torch.ops.aten.__class__.__init__", "unknown or not an aten operator"),
        ("torch.ops.aten.no_such_op.default", "unknown or not an aten operator"),
    ]:
        bad = tmp_path / "bad.pt2"
        with zipfile.ZipFile(archive) as src, zipfile.ZipFile(bad, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename.endswith("models/model.json"):
                    data = data.replace(b"torch.ops.aten.from_file.default", target.encode())
                dst.writestr(info, data)
        with pytest.raises(CheckpointError, match="refused to run the exported graph") as err:
            scan_pt2(bad)
        assert reason in str(err.value), (target, str(err.value))


def test_operator_rules() -> None:
    """Pure operators pass; file, storage, global-state, custom and higher-order ones do not."""
    aten = torch.ops.aten
    for op in (
        aten.linear.default,
        aten.conv2d.default,
        aten.group_norm.default,
        aten.silu.default,
        aten.gelu.default,  # a string option (approximate)
        aten.div.Tensor_mode,  # rounding_mode
        aten.einsum.default,
        aten.scaled_dot_product_attention.default,
        aten.upsample_nearest2d.vec,
        aten.fill_.Scalar,  # in place, in memory
        aten.cat.default,
    ):
        assert opvet.refused_reason(op) is None, op
    for op in (
        aten.from_file.default,
        aten.save.default,
        aten.set_.source_Storage,
        aten.set_.source_Tensor,
        aten._print.default,
        aten.manual_seed.default,
        aten.set_grad_enabled.default,
    ):
        assert opvet.refused_reason(op) is not None, op
    assert "higher-order" in (opvet.refused_reason(torch.ops.higher_order.cond) or "")
    assert opvet.refused_reason(os.system) == "not a tensor operator"
