"""Training data streamed from disk and the per-epoch checkpoint, in process: real photos, real Pillow, real torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featpipe import registry
from featpipe.checkpoint import Checkpoint
from featpipe.decode import PilDecoder, decode_files
from featpipe.errors import UserError
from featpipe.train_images import scan_images, stream


@pytest.fixture
def images(small_data):
    return scan_images(small_data, "mobilenet_v2", 0.2, 0)


def test_stream_yields_the_files_in_the_given_order_as_a_direct_decode_would(images):
    order = np.array([7, 3, 19, 0, 11, 5, 2])
    pre = registry.resolve("mobilenet_v2").preprocessing
    got = list(stream(images.paths, order, 3, pre, strict=True))
    assert [len(i) for i, _ in got] == [3, 3, 1]  # batches of 3, the last one short; two decode ahead of each
    assert np.array_equal(np.concatenate([i for i, _ in got]), order)
    direct = np.stack([r for _, r in decode_files([images.paths[i] for i in order], PilDecoder(pre))])
    assert torch.equal(torch.cat([b for _, b in got]), torch.from_numpy(direct))


def test_training_squares_leave_out_a_file_that_broke_and_evaluation_refuses_it(images, capsys):
    broken = images.paths[4]
    with open(broken, "wb") as fh:
        fh.write(b"\xff\xd8 no longer a jpeg")
    idx = np.arange(8)
    seen = np.concatenate([i for i, b in images.squares(idx, 3)])
    assert 4 not in seen and len(seen) == 7 and f"skipped {broken}" in capsys.readouterr().err
    with pytest.raises(UserError, match="no longer decodes"):
        list(images.crops(idx, 3))
    s = images.pre.resize
    assert next(images.squares(idx, 3))[1].shape == (3, s, s, 3)  # squares at resize; crops at the crop size
    assert next(images.crops(idx[:2]))[1].shape == (2, images.crop, images.crop, 3)


def test_scan_images_checks_files_without_keeping_pixels_and_groups_copies(small_data, capsys):
    (small_data / "tools" / "notes.txt").write_text("not an image")
    first = sorted((small_data / "animals").iterdir())[0]
    (small_data / "animals" / "copy.jpg").write_bytes(first.read_bytes())
    (small_data / "tools" / "cut.jpg").write_bytes(first.read_bytes()[:3000])  # its header is whole, its pixels not
    images = scan_images(small_data, "mobilenet_v2", 0.2, 0)
    err = capsys.readouterr().err
    assert "notes.txt" in err and "duplicate" in err and f"skipped {small_data / 'tools' / 'cut.jpg'}: decode" in err
    assert len(images.paths) == 21 and not any(p.endswith(("notes.txt", "cut.jpg")) for p in images.paths)
    a, b = images.paths.index(str(first)), images.paths.index(str(small_data / "animals" / "copy.jpg"))
    assert images.groups[a] == images.groups[b] and len(set(images.groups.tolist())) == 20
    assert set(images.split.val).isdisjoint(images.split.train) and not hasattr(images, "pixels")


def test_a_checkpoint_resumes_only_the_same_run(tmp_path, capsys):
    fp = {"method": "scratch", "seed": 0, "files": "abc"}
    Checkpoint(tmp_path, fp, resume=False).save({"epoch": 2, "history": [1, 2]})
    assert Checkpoint(tmp_path, fp, resume=True).load()["epoch"] == 2
    assert Checkpoint(tmp_path, fp, resume=False).load() is None  # a fresh run replaces it, and says so
    assert "--resume continues one" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"different run \(seed changed\)"):
        Checkpoint(tmp_path, fp | {"seed": 1}, resume=True).load()
    (tmp_path / "checkpoint.pt").write_bytes(b"torn")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        Checkpoint(tmp_path, fp, resume=True).load()
    Checkpoint(tmp_path, fp, resume=False).remove()
    assert Checkpoint(tmp_path / "none", fp, resume=True).load() is None
    assert "starting at epoch 1" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_training_commands_refuse_shards_in_one_line():
    from pathlib import Path

    from featpipe.experiment_config import ExperimentConfig
    from featpipe.train import TrainConfig

    for make in (TrainConfig, ExperimentConfig):
        with pytest.raises(UserError, match="WebDataset shards go to extract"):
            make(data_dir=Path("shards/train-{000000..000002}.tar"))


def test_batches_decode_through_extracts_decoders_and_the_nvjpeg_path_has_a_cpu_twin(images):
    """Training batches use decode.make_decoder: on a GPU that is nvJPEG; its CPU twin (torchvision on
    libjpeg-turbo) gives the Pillow path's images within resampling noise, in the same order and shapes."""
    order = np.arange(len(images.paths))[::-1].copy()
    pre = registry.resolve("mobilenet_v2").preprocessing
    pil = list(stream(images.paths, order, 8, pre, True, "pil"))
    twin = list(stream(images.paths, order, 8, pre, True, "torchvision"))
    assert [i.tolist() for i, _ in pil] == [i.tolist() for i, _ in twin]
    a, b = (torch.cat([x for _, x in run]).float() for run in (pil, twin))
    assert a.shape == b.shape and (a - b).abs().mean() < 1.0, (a - b).abs().mean()  # other images: ~70


def test_a_checkpoint_is_read_without_running_code_and_must_be_featpipes(tmp_path):
    """checkpoint.pt is a common name: one found in --out is loaded weights_only (a pickle that would run code is
    refused), and a torch file that is not featpipe's checkpoint is one line."""
    import pickle

    fp = {"method": "scratch"}
    torch.save({"a": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match="not a featpipe training checkpoint"):
        Checkpoint(tmp_path, fp, resume=True).load()

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps({"fingerprint": fp, "epoch": 1, "x": Payload()}))
    with pytest.raises(UserError, match="cannot read checkpoint"):
        Checkpoint(tmp_path, fp, resume=True).load()
    assert not (tmp_path / "ran").exists()


def test_the_resume_fingerprint_is_the_files_absolute_paths_labels_and_bytes(images, tmp_path, monkeypatch):
    """`d8` and `/abs/d8` are the same run; the same paths with other bytes are not."""
    from featpipe.train_images import split_images

    args = (images.y, images.classes)
    digests = ["a" * 64] * len(images.paths)
    rel_root = images.paths[0].rsplit("/", 2)[0]
    monkeypatch.chdir(rel_root)
    relative = [p.removeprefix(rel_root + "/") for p in images.paths]
    same = [split_images(paths, *args, digests, images.groups, images.pre, 0.2, 0).content
            for paths in (images.paths, relative)]
    other = split_images(images.paths, *args, ["b" * 64] + digests[1:], images.groups, images.pre, 0.2, 0).content
    assert same[0] == same[1] != other


def test_output_and_held_out_folders_are_checked_before_any_work(tmp_path, small_data):
    from featpipe.bundle import can_write, output_dir
    from featpipe.extract import ExtractConfig
    from featpipe.held_out import check_folders

    (tmp_path / "afile").write_text("x")
    assert can_write(tmp_path / "new" / "deeper") and not can_write(tmp_path / "afile" / "sub")
    with pytest.raises(UserError, match="not a writable directory"):
        output_dir(tmp_path / "afile" / "sub", "m", None, force=False)
    extract = ExtractConfig(data_dir=small_data)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "one.jpg").write_bytes(next((small_data / "tools").iterdir()).read_bytes())
    with pytest.raises(UserError, match=f"--val-dir {flat} has no class folders"):
        check_folders(extract, flat, None)
    for val, test, flag in ((small_data, small_data, "DATA_DIR"), (tmp_path, tmp_path, "--val-dir")):
        with pytest.raises(UserError, match=f"--test-dir is {flag}"):
            check_folders(extract, None if flag == "DATA_DIR" else val, test)


def test_embeddings_that_are_not_finite_are_refused():
    from featpipe.rows import require_finite

    require_finite(np.ones((3, 4), np.float32), ["a", "b", "c"])
    X = np.ones((3, 4), np.float32)
    X[1, 2] = np.nan
    with pytest.raises(UserError, match="1 embedding.*not finite.*e.g. b"):
        require_finite(X, ["a", "b", "c"])


def test_weights_that_do_not_fit_name_the_keys():
    from featpipe.backbone import state_mismatch

    net = torch.nn.Linear(2, 3)
    with pytest.raises(RuntimeError) as e:
        net.load_state_dict({"weight": torch.zeros(3, 5), "bias": torch.zeros(3)})
    assert "size mismatch for weight" in state_mismatch(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_training_batches_on_a_gpu_are_nvjpeg_crops_that_match_the_cpu_twin(images):
    """What finetune streams on a GPU (decoder auto, cuda 0): crops already on the card, the same images as the
    CPU twin within resampling noise, in the same order."""
    order = np.arange(len(images.paths))
    pre = registry.resolve("mobilenet_v2").preprocessing
    gpu = list(stream(images.paths, order, 8, pre, True, "auto", 0))
    twin = list(stream(images.paths, order, 8, pre, True, "torchvision"))
    assert all(x.is_cuda for _, x in gpu) and [i.tolist() for i, _ in gpu] == [i.tolist() for i, _ in twin]
    a, b = (torch.cat([x.cpu() for _, x in run]).float() for run in (gpu, twin))
    assert a.shape == b.shape and (a - b).abs().mean() < 1.0, (a - b).abs().mean()
