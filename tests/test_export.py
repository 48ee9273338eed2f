"""kbnet-export: ONNX and torch.export programs verified at sizes other than the traced one, safetensors round
trips (official key names), the decomposed KBA against the official operator, and every bad input."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from kbnet.errors import UserError
from kbnet.export import TOLERANCE, ExportError, export, main, trace
from kbnet.inference.loading import load_model
from kbnet.inference.onnx_model import OnnxModel, OnnxModelError
from kbnet.models import KBNetL, KBNetS, create_model, load_weights
from kbnet.ops import kba, kba_reference, use_kba
from kbnet.ops.kba_decomposed import kba_grouped_conv, kba_unfold_matmul
from tests.helpers.checkpoints import save_official_checkpoint, save_project_checkpoint
from tests.helpers.configs import SMALL_DEMO, compose_eval
from tests.helpers.images import write_rgb
from tests.helpers.reference import load_reference, relative_error
from tests.helpers.threads import torch_threads

pytestmark = pytest.mark.usefixtures("single_thread")

SIZES = ((64, 64), (250, 333), (37, 29))


@pytest.mark.parametrize("function", [kba_grouped_conv, kba_unfold_matmul])
def test_decomposed_kba_matches_official_operator(function):
    """Forward and all four gradients of both formulations against the official code's tensors, float64."""
    for case in load_reference("kba_op.pt"):
        inputs = [case[k].clone().requires_grad_() for k in ("x", "att", "w", "b")]
        out = function(*inputs, case["k"], case["groups"])
        out.backward(case["grad_out"])
        assert relative_error(out, case["out"]) < 1e-6
        for tensor, key in zip(inputs, ("grad_x", "grad_att", "grad_w", "grad_b"), strict=True):
            assert relative_error(tensor.grad, case[key]) < 1e-6, key


def test_decomposed_is_an_implementation_of_kba():
    """``use_kba("decomposed")`` runs a whole network on it, with the outputs and gradients of the reference."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 16, 9, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    att = torch.randn(2, 32, 9, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 32, 16 * 2 * 9, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 32, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    expected = kba_reference(x, att, w, b, 3, 8)
    grads = torch.autograd.grad(expected.square().sum(), (x, att, w, b))
    with use_kba("decomposed"):
        got = kba(x, att, w, b, 3, 8)
    assert relative_error(got, expected) < 1e-12
    for g, e in zip(torch.autograd.grad(got.square().sum(), (x, att, w, b)), grads, strict=True):
        assert relative_error(g, e) < 1e-12
    net = create_model("kbnet_l_tiny").eval()
    image = torch.rand(1, 3, 21, 19, generator=generator)
    with torch.no_grad(), use_kba("decomposed"):
        decomposed = net(image)
    with torch.no_grad():
        assert (decomposed - net(image)).abs().max().item() < 1e-5


@pytest.fixture(scope="module", params=["kbnet_s_tiny", pytest.param("kbnet_l_tiny", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory):
    """One official-format file per tiny preset, exported to .onnx and .pt2 from one trace (messages kept). KBNet_l's
    export takes 1.5 minutes on 2 cores, so its tests are slow ones (``pytest -m slow``)."""
    folder = tmp_path_factory.mktemp(request.param)
    source = folder / "official.pth"
    net = save_official_checkpoint(source, request.param).eval()
    lines: list[str] = []
    with torch_threads(1):
        results = export(source, [folder / "model.onnx", folder / "model.pt2"], preset=request.param, sizes=SIZES,
                         log=lines.append)
    return request.param, net, source, {r.format: r for r in results}, lines


def _check_differences(result, lines):
    assert set(result.verification.differences) == {"1×64×64", "1×250×333", "2×37×29"}
    assert 0 < result.verification.worst <= TOLERANCE
    assert any("1×250×333: max abs diff" in line for line in lines)


def test_onnx_export_is_verified_and_runs_any_size(exported):
    name, net, _, results, lines = exported
    result = results["onnx"]
    _check_differences(result, lines)
    graph = onnx.load(str(result.path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # dynamic batch, height, width
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["kbnet.preset"] == name and json.loads(meta["kbnet.config"])["name"] == name
    model = OnnxModel.load(result.path)
    assert model.channels == 3 and model.preset == name
    for h, w in ((13, 7), (40, 9)):  # below and between the size multiples, not verified by the export
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            assert (model(x) - net(x)).abs().max().item() < TOLERANCE
    assert not list(result.path.parent.glob(".*tmp*"))


def test_pt2_export_is_verified_and_holds_only_aten(exported):
    _, net, _, results, lines = exported
    result = results["pt2"]
    _check_differences(result, lines)
    program = torch.export.load(result.path)
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    operators = {t for t in targets if isinstance(t, torch._ops.OpOverload)}
    assert {op.namespace for op in operators} == {"aten"}  # no kbnet (or any custom) operator
    assert all(type(t).__name__ == "builtin_function_or_method" for t in targets - operators)  # shape arithmetic
    x = torch.rand(3, 3, 24, 41)
    with torch.no_grad():
        assert (program.module()(x) - net(x)).abs().max().item() < TOLERANCE


def test_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    """A program that does not reproduce the model (here: traced from other weights) fails its verification, and
    the staged file is deleted: no output, no temporary file. (A one-level KBNet_s keeps the trace short.)"""
    small = {"width": 8, "enc_blk_nums": [1], "dec_blk_nums": [1], "middle_blk_num": 1}
    source = tmp_path / "run.ckpt"
    save_project_checkpoint(source, "kbnet_s_tiny", **small)
    torch.manual_seed(123)
    program = trace(create_model("kbnet_s_tiny", **small).eval())
    monkeypatch.setattr("kbnet.export.trace", lambda _: program)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"verification failed, max abs diff .* > 0.0001"):
        export(source, out / "model.pt2", sizes=((24, 40),), log=lambda _: None)
    assert list(out.iterdir()) == []


def test_restore_with_exported_onnx(exported, tmp_path):
    """kbnet-restore takes the .onnx file and writes what the PyTorch model restores; a wrong preset is refused."""
    from kbnet.restore import main as restore_main

    name, net, _, results, _ = exported
    photo = (np.random.default_rng(0).random((30, 45, 3)) * 255).astype(np.uint8)
    write_rgb(tmp_path / "in.png", photo)
    assert restore_main([str(tmp_path / "in.png"), "-c", str(results["onnx"].path), "-o", str(tmp_path / "out"),
                         "-q", "--device", "cpu"]) == 0
    from kbnet.imageio import read_image

    restored = read_image(tmp_path / "out" / "in.png").pixels
    x = torch.from_numpy(photo.transpose(2, 0, 1)[None] / 255.0).float()
    with torch.no_grad():
        expected = net(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert np.abs(restored - expected).max() <= 1 / 255 + 1e-6
    other = "kbnet_l_tiny" if name == "kbnet_s_tiny" else "kbnet_s_tiny"
    with pytest.raises(OnnxModelError, match=f"an export of '{name}', not '{other}'"):
        load_model(results["onnx"].path, preset=other)


def test_safetensors_round_trip_official_keys(tmp_path):
    """Official file -> .safetensors (official key names, preset + config metadata) -> load_weights / load_model."""
    source = tmp_path / "official.pth"
    net = save_official_checkpoint(source, "kbnet_l_tiny", wrapper="params", data_parallel=True)
    (result,) = export(source, tmp_path / "w.safetensors", preset="kbnet_l_tiny", log=lambda _: None)
    assert result.verification.worst == 0
    from safetensors import safe_open

    with safe_open(str(result.path), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(net.state_dict())
        meta = handle.metadata()
    assert meta["kbnet.preset"] == "kbnet_l_tiny" and meta["kbnet.arch"] == "KBNet_l"
    fresh = load_weights(create_model("kbnet_l_tiny"), result.path)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in net.state_dict().items())
    rebuilt = load_model(result.path)  # no preset needed: the metadata rebuilds the model
    assert rebuilt.name == "kbnet_l_tiny" and isinstance(rebuilt.model, KBNetL)
    with pytest.raises(ValueError, match="holds a 'kbnet_l_tiny' model, not 'kbnet_s_tiny'"):
        load_model(result.path, preset="kbnet_s_tiny")


def test_safetensors_of_the_official_reference_network(tmp_path):
    """Bare official weights saved as safetensors (no metadata) load by preset and reproduce the official output."""
    ref = load_reference("kbnet_s_small.pt")
    path = tmp_path / "official.safetensors"
    save_file({k: v.contiguous() for k, v in ref["state_dict"].items()}, str(path))
    net = load_weights(KBNetS(**ref["kwargs"]), path).double().eval()
    with torch.no_grad():
        assert relative_error(net(ref["input"].double()), ref["output"]) < 1e-6
    with pytest.raises(ValueError, match="has no kbnet metadata"):
        load_model(path)


def test_project_checkpoint_to_safetensors_keeps_overrides(tmp_path):
    source = tmp_path / "run.ckpt"
    net = save_project_checkpoint(source, "kbnet_s_tiny", width=8)
    main([str(source), "-o", str(tmp_path / "w.safetensors")])
    loaded = load_model(tmp_path / "w.safetensors")
    assert loaded.config["width"] == 8
    x = torch.rand(1, 3, 20, 18)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), net.eval()(x))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: "), err
    return err


def test_bad_inputs_one_line_nothing_written(tmp_path, capsys, monkeypatch):
    source = tmp_path / "official.pth"
    save_official_checkpoint(source, "kbnet_s_tiny")
    out = tmp_path / "out.onnx"
    assert main([str(source), "-o", str(out), "-m", "kbnet_x"]) == 2
    assert "unknown preset 'kbnet_x'" in _error_line(capsys)
    assert main([str(source), "-o", str(out), "-m", "kbnet_l_tiny"]) == 2
    assert "does not fit" in _error_line(capsys)
    assert main([str(source), "-o", str(tmp_path / "out.tflite"), "-m", "kbnet_s_tiny"]) == 2
    assert "cannot tell the format" in _error_line(capsys)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([str(source), "-o", str(blocker / "out.onnx"), "-m", "kbnet_s_tiny"]) == 2
    assert "cannot create the output folder" in _error_line(capsys)
    out.write_bytes(b"keep me")
    assert main([str(source), "-o", str(out), "-m", "kbnet_s_tiny"]) == 2
    assert "refusing to overwrite" in _error_line(capsys) and out.read_bytes() == b"keep me"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main([str(source), "-o", str(tmp_path / "new.onnx"), "-m", "kbnet_s_tiny"]) == 2
    assert "needs onnxruntime" in _error_line(capsys)
    with pytest.raises(UserError, match="needs onnxruntime"):
        OnnxModel.load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "official.pth", "out.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kbnet_s_sidd", "kbnet_s", "kbnet_l"])
def test_full_presets_export(name, tmp_path):
    """The published configurations (random weights) export to .onnx and .pt2 within 1e-4 at three sizes."""
    source = tmp_path / "official.pth"
    torch.save({"params": create_model(name).state_dict()}, source)
    lines: list[str] = []
    with torch_threads(2):
        results = export(source, [tmp_path / "m.onnx", tmp_path / "m.pt2"], preset=name, sizes=SIZES,
                         log=lines.append)
    print("\n".join(lines))
    for result in results:
        assert result.verification.worst <= TOLERANCE
        assert "1×250×333" in result.verification.differences


def test_evaluate_scores_an_exported_onnx_like_the_pytorch_model(exported, tmp_path):
    """evaluate.py with pretrained=<.onnx>: the paper's protocol on the deployed file gives the PyTorch scores; a
    task with another channel count is refused before anything is written."""
    from kbnet.evaluation import evaluate

    name, _, source, results, _ = exported
    task = "gaussian_denoise" if name == "kbnet_s_tiny" else "derain"
    onnx_run = evaluate(compose_eval(tmp_path / "onnx", f"task={task}", f"pretrained={results['onnx'].path}",
                                     *SMALL_DEMO))
    torch_run = evaluate(compose_eval(tmp_path / "torch", f"task={task}", f"pretrained={source}", f"model={name}",
                                      *SMALL_DEMO))
    for metric, value in torch_run["results"]["demo"].items():
        if isinstance(value, float):
            assert onnx_run["results"]["demo"][metric] == pytest.approx(value, abs=1e-3), metric
    with pytest.raises(OnnxModelError, match="takes 3-channel images, but 1 were expected"):
        evaluate(compose_eval(tmp_path / "gray", "task=gaussian_denoise_gray", f"pretrained={results['onnx'].path}"))
    assert not (tmp_path / "gray").exists()
