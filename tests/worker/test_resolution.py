"""Resolution end to end in one worker runtime (issue 13): train at 2x the base's side, sample there.

The tiny base is 8 px; a job at 16 px is this repository's 256 -> 512 case
(the base's 4x4 patch grid becomes 8x8, positions interpolated).
"""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from difffit.contract import AdapterRef, GenerateTask
from difffit.errors import InvalidDataset, InvalidRequest
from difffit.settings import Settings
from tests.e2e.conftest import class_folder_zip
from worker.runtime import Runtime


@pytest.fixture(scope="module")
def runtime(tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resolution")
    settings = Settings(
        data_dir=tmp, base_model=tiny_base, adapter_slots=3, max_classes=10, allow_file_urls=True,
        train_microbatch=3,
    )  # fmt: skip
    rt = Runtime(settings)
    yield rt
    rt.engine.stop()


def _finetune(rt, tmp_path, name: str, classes: list[str], **request):
    tenant = rt.registry.create_tenant(f"t-{name}")
    url = class_folder_zip(tmp_path / f"{name}.zip", classes, per_class=4).as_uri()
    body = {"dataset_url": url, "adapter": name, "steps": 3, "batch_size": 8, **request}
    job, _ = rt.registry.create_job(tenant.id, name, body, total_steps=body["steps"])
    rt.finetune(job.id)
    job = rt.registry.get_job_unscoped(job.id)
    return tenant, job


def _sizes(rt, ref, resolution=None) -> list[tuple[int, int]]:
    task = GenerateTask(
        request_id="r", adapter=ref, class_labels=[0, 1], seed=1, steps=2, resolution=resolution
    )
    return [Image.open(io.BytesIO(base64.b64decode(b))).size for b in rt.generate(task).images_png_b64]


def test_an_adapter_trained_at_twice_the_base_side_samples_there_by_default(runtime, tmp_path):
    assert runtime.base.resolution == 8
    tenant, job = _finetune(runtime, tmp_path, "big", ["dark", "light"], resolution=16)
    assert job.state == "succeeded", job.error_message
    v = runtime.registry.get_version(tenant.id, "big")
    assert v.resolution == 16
    ref = AdapterRef(name="big", version=v.version, sha256=v.sha256, tenant_id=tenant.id)
    assert _sizes(runtime, ref) == [(16, 16), (16, 16)]  # no resolution: the version's
    assert _sizes(runtime, ref, 16) == [(16, 16), (16, 16)]
    with pytest.raises(InvalidRequest, match="samples at 16 px.*got 8. Allowed values: 16"):
        _sizes(runtime, ref, 8)
    assert _sizes(runtime, None) == [(8, 8), (8, 8)]  # the base: its own side
    with pytest.raises(InvalidRequest, match="Allowed values: 8"):
        _sizes(runtime, None, 16)


def test_class_table_keep_trains_the_base_classes_from_the_base_table(runtime, tmp_path):
    base_names = runtime.base.class_names
    tenant, job = _finetune(runtime, tmp_path, "same", [base_names[3], "7"], class_table="keep")
    assert job.state == "succeeded", job.error_message
    v = runtime.registry.get_version(tenant.id, "same")
    assert v.class_names == base_names
    tensors, meta = runtime.adapter(v.sha256)
    assert tensors["class_table"].shape[0] == len(base_names) + 1 and meta["num_classes"] == len(base_names)
    # Rows of classes absent from the data set keep the base's values (no gradient reaches them).
    base_table = runtime.engine.model.base_adapter()["class_table"].float()
    assert (tensors["class_table"][0] == base_table[0]).all()
    assert not (tensors["class_table"][3] == base_table[3]).all()


def test_class_table_keep_names_a_folder_that_is_no_base_class(runtime, tmp_path):
    _, job = _finetune(runtime, tmp_path, "odd", ["0", "zebra"], class_table="keep")
    assert job.state == "failed" and job.error_code == InvalidDataset.code and "zebra" in job.error_message
