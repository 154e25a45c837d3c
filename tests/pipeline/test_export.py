"""``aqcf-export``: torch.export programs and ONNX files agree with the eager network at other batch and
spatial sizes than they were traced with, and ``aqcf-predict`` writes the same masks from a ``.pt2``.

The 2D case is the tiny joint run of conftest.py (exported once, CLI, ``--modality ct``); 3D, instance
norm, grouped/padded convs and the A-QCF attention are checked on small networks built here with
random weights and running statistics (a fresh network's norms are near the identity, and a fresh
A-QCF block is the identity: ``alpha`` is set away from 0 so the attention reaches the output).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _threads import intra_op_threads
from torch import nn

from aqcf_kernels import nn as qnn
from aqcf_kernels.models import AQCFNet
from aqcf_kernels.ops import lowerings
from aqcf_kernels.pipeline import export as ex
from aqcf_kernels.pipeline import predict as pr
from aqcf_kernels.pipeline.checkpoint import load_run_checkpoint

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

#: fp32: the lowered graphs re-associate sums (expanded-weight conv, folded norms), ~1e-7 relative.
RTOL, ATOL = 1e-4, 1e-5


def _random_input(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _randomise_norms(net: nn.Module, seed: int) -> nn.Module:
    """Running statistics and affine parameters away from their identity-like initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, qnn.norm._QuaternionNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return net


def _ort_session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Exported:
    run_dir: Path
    out: Path
    stdout: str

    @property
    def pt2(self) -> Path:
        return self.out / "best-ct.pt2"

    @property
    def onnx(self) -> Path:
        return self.out / "best-ct.onnx"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The tiny joint run's CT stream exported as pt2 and ONNX by the CLI (one thread: see conftest.py)."""
    with intra_op_threads(1):
        run_dir = trained("joint")
        out = tmp_path_factory.mktemp("export")
        import contextlib
        import io

        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = ex.main([str(run_dir), "--format", "pt2", "onnx", "--modality", "ct", "-o", str(out)])
        assert code == 0
        return Exported(run_dir, out, stdout.getvalue())


@pytest.fixture(scope="module")
def loaded(exported: Exported) -> tuple[ex.ExportedNet, object]:
    """``load_exported`` of the .pt2 (torch.export.load takes seconds here: loaded once)."""
    return ex.load_exported(exported.pt2)


@pytest.fixture(scope="module")
def program(loaded) -> nn.Module:
    """The raw program (``torch.export.load(...).module()``): no aqcf_kernels class, only its registered ops."""
    return loaded[0].program


@pytest.fixture(scope="module")
def eager(exported: Exported) -> nn.Module:
    model, _, _ = load_run_checkpoint(exported.run_dir / "best.pt", "cpu")
    return model


# ------------------------------------------------------------------------------------------- CLI


def test_cli_writes_both_formats_with_metadata(exported: Exported, loaded) -> None:
    lines = exported.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("wrote ") for line in lines)
    assert "(pt2, ct" in lines[0] and "(onnx, ct" in lines[1]
    for line in lines:  # the input spec of the tiny run: 2 levels, 48x48 crops
        assert "image float32 (batch, 1, H, W) -> logits float32 (batch, 3, H, W)" in line
        assert "multiples of 4, at least 8" in line and "matches the eager model within" in line
    config = torch.load(exported.run_dir / "best.pt", map_location="cpu", weights_only=False)["config"]
    net, cfg = loaded
    assert net.exported_modality == "ct" and cfg.to_dict() == config
    assert net.metadata["input"]["roi"] == [48, 48] and net.metadata["device"] == "cpu"
    meta = json.loads(_ort_session(exported.onnx).get_modelmeta().custom_metadata_map["aqcf_export"])
    assert meta["modality"] == "ct" and meta["config"] == config and meta["classes"] == list(pr.CLASSES)


# ------------------------------------------------------------------------------------------- pt2


@pytest.mark.parametrize("batch, size", [(1, (48, 48)), (3, (32, 56))])
def test_pt2_program_matches_eager(program: nn.Module, eager: nn.Module, batch: int, size: tuple) -> None:
    # the raw program: no aqcf_kernels class involved, only its registered ops
    x = _random_input(batch, 1, *size, seed=batch)
    with torch.no_grad():
        torch.testing.assert_close(program(x), eager(ct=x)["ct"], rtol=1e-5, atol=1e-6)


def test_pt2_net_pads_like_the_model(loaded, program: nn.Module, eager: nn.Module) -> None:
    """Sizes the program refuses (not multiples of 4) go through ExportedNet's padding, as the model pads."""
    x = _random_input(2, 1, 45, 50, seed=7)
    # (torch words the refusal from the model's padding: the remainder of each size by 4 must be 0)
    with pytest.raises(Exception, match=r"Guard failed: .*image\.size\(\)\[3\].*// 4\) == 0"):
        program(x)
    net, _ = loaded
    with torch.no_grad():
        torch.testing.assert_close(net(ct=x)["ct"], eager(ct=x)["ct"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="predicts ct only"):
        net(mri=x)


# ------------------------------------------------------------------------------------------ ONNX


@pytest.mark.parametrize("batch, size", [(1, (48, 48)), (3, (32, 56))])
def test_onnx_runtime_matches_eager(exported: Exported, eager: nn.Module, batch: int, size: tuple) -> None:
    x = _random_input(batch, 1, *size, seed=10 + batch)
    out = _ort_session(exported.onnx).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), eager(ct=x)["ct"], rtol=RTOL, atol=ATOL)


def test_onnx_graph_is_standard_onnx(exported: Exported) -> None:
    model = onnx.load(exported.onnx)
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"} and not model.functions
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")][0] >= 17
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "ConvTranspose"} <= ops and not any("aqcf" in op.lower() for op in ops)
    (image,) = model.graph.input
    dims = image.type.tensor_type.shape.dim
    assert dims[1].dim_value == 1 and all(d.dim_param for d in (dims[0], dims[2], dims[3]))  # batch, H, W dynamic


# --------------------------------------------------------------------------------------- predict


def test_predict_with_pt2_writes_the_same_masks(exported: Exported, datasets, tmp_path: Path) -> None:
    scan = next(datasets.ct.rglob("volume-0.nii*"))
    common = ["-i", str(scan), "--modality", "ct", "--tta", "--save-probabilities", "--quiet", "--device", "cpu"]
    assert pr.main([*common, "--run", str(exported.run_dir), "-o", str(tmp_path / "ckpt")]) == 0
    # A deployment folder holding only the exported program (no .pt, no model code needed).
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    shutil.copy(exported.pt2, deploy)
    assert pr.main([*common, "--run", str(deploy), "--checkpoint", "best-ct.pt2", "-o", str(tmp_path / "pt2")]) == 0

    name = f"{pr._case_id(pr._nifti_stem(scan.name))}"
    mask_ckpt = np.asarray(nib.load(tmp_path / "ckpt" / f"{name}.nii.gz").dataobj)
    mask_pt2 = np.asarray(nib.load(tmp_path / "pt2" / f"{name}.nii.gz").dataobj)
    np.testing.assert_array_equal(mask_pt2, mask_ckpt)
    probs_ckpt = np.load(tmp_path / "ckpt" / f"{name}.npz")["probabilities"]
    probs_pt2 = np.load(tmp_path / "pt2" / f"{name}.npz")["probabilities"]
    np.testing.assert_allclose(probs_pt2, probs_ckpt, rtol=1e-5, atol=1e-6)
    assert probs_ckpt[1:].max() > 0.05  # the tiny run predicts something, so equality is not vacuous
    provenance = json.loads((tmp_path / "pt2" / "predict.json").read_text())
    assert provenance["members"][0]["checkpoint"].endswith("best-ct.pt2")


# ------------------------------------------------------------------------ 3D, lowerings, attention


class _Joint(nn.Module):
    """Both streams of a joint network at once: the A-QCF fusion (attention ops) in the graph."""

    def __init__(self, net: AQCFNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, ct: torch.Tensor, mri: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(ct=ct, mri=mri)
        return out["ct"], out["mri"]


def test_3d_instance_norm_pt2_and_onnx(tmp_path: Path) -> None:
    """A 3D network as aqcf-export writes it (one stream), instance norm and GELU: pt2 and ONNX at two
    batch and two spatial sizes."""
    net = AQCFNet(3, features=(8,), bottleneck=8, mode="mri", norm="instance", act="gelu").eval()
    _randomise_norms(net, seed=3)
    spec = ex.InputSpec(3, 1, 3, 2, (8, 12, 12))
    program = ex.export_program(net, "mri", spec).module()
    session = _ort_session(ex.export_onnx(net, "mri", spec, tmp_path / "net3d.onnx"))
    for batch, size in ((1, (4, 8, 6)), (2, (6, 10, 12))):
        x = _random_input(batch, 1, *size, seed=batch)
        with torch.no_grad():
            ref = net(mri=x)["mri"]
            torch.testing.assert_close(program(x), ref, rtol=1e-5, atol=1e-6)
        out = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_attention_lowerings_match_the_ops() -> None:
    """The A-QCF attention and gated residual lowerings (what ONNX gets) against the ops, both directions,
    token counts of the streams differing; the lowerings run eagerly here (the traced use is the slow test)."""
    q_a, k_a, v_a = (_random_input(2, 3, 7, 8, seed=s) for s in (1, 2, 3))
    q_b, k_b, v_b = (_random_input(2, 3, 5, 8, seed=s) for s in (4, 5, 6))
    want = torch.ops.aqcf.cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, 0.3)
    got = lowerings.cross_attention_lowering(q_a, k_a, v_a, q_b, k_b, v_b, 0.3)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    f, o, gate = (_random_input(2, 8, 6, seed=s) for s in (7, 8, 9))
    alpha = torch.tensor(0.6)
    for logits in (gate, gate.mean(2, keepdim=True)):  # per token, and per channel (broadcast)
        want = torch.ops.aqcf.gated_residual(f, o, logits, alpha)
        torch.testing.assert_close(lowerings.gated_residual_lowering(f, o, logits, alpha), want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # ~75 s of CPU on 2 cores: shape reasoning over two streams' dynamic token counts
def test_3d_fused_joint_network_pt2_and_onnx(tmp_path: Path) -> None:
    """3D, instance norm, GELU and the A-QCF attention: the pt2 program keeps the attention op (its fake
    serves the export), ONNX lowers it to MatMul/Softmax; both agree with eager at two batch and two sizes
    per stream (the streams' sizes differ, so the attention is not square)."""
    from torch.export import Dim

    net = AQCFNet(3, features=(8,), bottleneck=8, heads=2, kv_pool=None, norm="instance", act="gelu").eval()
    _randomise_norms(net, seed=3)
    with torch.no_grad():  # a fresh A-QCF block is the identity (alpha = 0): let the attention through
        net.fusion["0"].alpha_a.fill_(0.7)
        net.fusion["0"].alpha_b.fill_(-0.5)
    joint = _Joint(net).eval()
    batch = Dim("batch", min=1)
    shapes = {
        name: {0: batch, **{2 + i: Dim(f"{name}_{axis}", min=2) * 2 for i, axis in enumerate("dhw")}}
        for name in ("ct", "mri")
    }
    args = (_random_input(2, 1, 4, 8, 8, seed=1), _random_input(2, 1, 6, 6, 10, seed=2))
    program = torch.export.export(joint, args, dynamic_shapes=shapes)
    assert "aqcf.cross_attention.default" in ex._custom_ops(program)
    onnx_model = ex.onnx_program(joint, args, shapes, ["ct", "mri"], ["logits_ct", "logits_mri"])
    assert {"MatMul", "Softmax", "Sigmoid"} <= {n.op_type for n in onnx_model.model.graph}
    onnx_model.save(tmp_path / "joint3d.onnx", external_data=False)
    session = _ort_session(tmp_path / "joint3d.onnx")
    for b, size_ct, size_mri in ((1, (4, 6, 8), (8, 4, 6)), (3, (6, 10, 8), (4, 4, 12))):
        ct, mri = _random_input(b, 1, *size_ct, seed=b), _random_input(b, 1, *size_mri, seed=b + 1)
        with torch.no_grad():
            ref = joint(ct, mri)
            alone = net(ct=ct)["ct"]
            out = program.module()(ct, mri)
        assert (ref[0] - alone).abs().max() > 1e-3  # the fusion changes the CT logits: attention is exercised
        for got, want in zip(out, ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip(session.run(None, {"ct": ct.numpy(), "mri": mri.numpy()}), ref, strict=True):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_a_modality_program_carries_only_its_own_weights(modality: str) -> None:
    """A joint network's CT program used to hold the MRI stem and encoder and the fusion blocks too
    (torch.export keeps every parameter of the module it traces): 42 of 154 tensors for nothing."""
    net = AQCFNet(2, features=(8, 16), bottleneck=16).eval()
    program = ex.export_program(net, modality, ex.InputSpec(2, 1, 3, 4, (16, 16)))
    other = "mri" if modality == "ct" else "ct"
    names = set(program.state_dict)
    assert names and not [n for n in names if f".{other}." in n or ".fusion." in n]
    used = {f"net.{n}" for n, _ in net.named_parameters() if f".{other}." not in n and not n.startswith("fusion.")}
    assert used <= names
    x = _random_input(2, 1, 16, 24, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), net(**{modality: x})[modality], rtol=1e-5, atol=1e-6)


class _Layers(nn.Module):
    """Every conv/norm variant the lowerings handle: grouped, reflect- and 'same'-padded, transposed,
    batch norm with running statistics and instance norm without, fused activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = qnn.QuaternionConv2d(8, 16, 3, padding=1, groups=2, padding_mode="reflect")
        self.bn = qnn.QuaternionBatchNorm2d(16, activation="leaky_relu", negative_slope=0.2)
        self.same = qnn.QuaternionConv2d(16, 8, 2, padding="same", bias=False)
        self.up = qnn.QuaternionConvTranspose2d(8, 8, 2, stride=2)
        self.inorm = qnn.QuaternionInstanceNorm2d(8, affine=True, activation="gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inorm(self.up(self.same(self.bn(self.conv(x)))))


def test_lowerings_match_the_ops() -> None:
    """The module lowering (ONNX's) and the op decompositions (ops.lowerings) both equal the eager layers."""
    layers = _randomise_norms(_Layers(), seed=5).eval()
    x = _random_input(2, 8, 10, 12, seed=5)
    with torch.no_grad():
        ref = layers(x)
        torch.testing.assert_close(ex.lowered_for_onnx(layers)(x), ref, rtol=RTOL, atol=ATOL)
        conv = ex.lowered_for_onnx(layers.conv)
        torch.testing.assert_close(conv(x[0]), layers.conv(x[0]), rtol=RTOL, atol=ATOL)  # unbatched
    assert all(p is not layers.conv.weight for p in ex.lowered_for_onnx(layers).parameters())  # a copy
    program = torch.export.export(layers, (x,))
    assert "aqcf.qconv.default" in ex._custom_ops(program)
    lowered = ex.lower_custom_ops(program)
    assert ex._custom_ops(lowered) == []
    with torch.no_grad():
        torch.testing.assert_close(lowered.module()(x), ref, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------- errors


def test_errors_are_one_line(exported: Exported, tmp_path: Path, capsys, monkeypatch) -> None:
    run = str(exported.run_dir)
    cases = [
        ([str(tmp_path / "nowhere")], "run folder"),
        ([run, "--format", "tflite"], "--format tflite: expected pt2 and/or onnx"),
        ([run, "--checkpoint", "epoch7.pt"], "does not exist"),
        ([run, "--checkpoint", str(exported.pt2)], "already an exported program"),
        ([run, "--device", "cuda:7"], "--device"),
    ]
    for argv, message in cases:
        assert ex.main([*argv, "-o", str(tmp_path / "out"), "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("aqcf-export: error: ") and message in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err
    monkeypatch.setattr(ex, "_onnx_missing", lambda: ["onnxscript"])
    assert ex.main([run, "--format", "onnx", "-o", str(tmp_path / "out")]) == 2
    assert "pip install 'aqcf-kernels[export]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written by a failed command


def test_predict_names_what_the_exported_file_holds(exported: Exported, datasets, tmp_path: Path, capsys) -> None:
    """The run is joint; the .pt2 holds CT only: the error names the file (it said the run was trained for ct
    only). An .onnx file is not a checkpoint for aqcf-predict: said so (it was an UnpicklingError)."""
    scan = next(datasets.ct.rglob("volume-0.nii*"))
    common = ["-i", str(scan), "-o", str(tmp_path / "out"), "--run", str(exported.run_dir), "--quiet"]
    assert pr.main([*common, "--checkpoint", str(exported.pt2), "--modality", "mri"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aqcf-predict: error: --modality mri: {exported.pt2} (an aqcf-export file of a ") and (
        "holds the ct stream only; export the mri one (aqcf-export RUN_DIR --modality mri)" in err
    ), err
    assert "was trained for" not in err and err.count("\n") == 1
    assert pr.main([*common, "--checkpoint", str(exported.onnx), "--modality", "ct"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"aqcf-predict: error: --checkpoint {exported.onnx}: an ONNX file cannot be used here (it is for ONNX "
        "Runtime); give the run's .pt checkpoint or the .pt2 program aqcf-export wrote next to it\n"
    )
    assert not (tmp_path / "out").exists()


def test_loading_errors(exported: Exported, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a program")
    with pytest.raises(ex.ExportError, match="not a readable torch.export program"):
        ex.load_exported(junk)
    # A program exported on a GPU machine, met on this CPU one: named, with the way out (the metadata is
    # rewritten in the archive, which is how torch.export.save stores extra files).
    gpu = tmp_path / "gpu.pt2"
    with zipfile.ZipFile(exported.pt2) as src, zipfile.ZipFile(gpu, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/extra/" + ex.METADATA_FILE):
                data = json.dumps({**json.loads(data), "device": "cuda"}).encode()
            dst.writestr(item, data)
    with pytest.raises(ex.ExportError, match="exported for cuda .* --device cuda"):
        ex.load_exported(gpu, "cpu")
