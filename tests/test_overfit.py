"""Both detectors can memorise two small images: the loss falls by more than 10x and the
predicted boxes land on the objects. Tiny models, CPU, a few seconds each."""
import pytest
import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from ddetr_minimal.models.build import build_model

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.3, 0.9]])  # one per class
SIZE = 64
TINY = dict(backbone="small", small_channels=(16, 32, 64), d_model=64, n_heads=4, enc_layers=2, dec_layers=2,
            dim_feedforward=128, num_queries=10, dropout=0.0)


def _scene(objects):
    """A grey image with filled rectangles (class, (x0, y0, x1, y1)), and its target dict."""
    img = torch.full((3, SIZE, SIZE), 0.5)
    labels, boxes = [], []
    for c, (x0, y0, x1, y1) in objects:
        img[:, y0:y1, x0:x1] = COLOURS[c].view(3, 1, 1)
        labels.append(c)
        boxes.append([(x0 + x1) / 2 / SIZE, (y0 + y1) / 2 / SIZE, (x1 - x0) / SIZE, (y1 - y0) / SIZE])
    return (img - MEAN) / STD, {"labels": torch.tensor(labels), "boxes": torch.tensor(boxes)}


def _data():
    a = _scene([(0, (6, 8, 30, 28)), (2, (36, 30, 60, 58))])
    b = _scene([(1, (20, 12, 50, 44))])
    return torch.stack([a[0], b[0]]), torch.zeros(2, SIZE, SIZE, dtype=torch.bool), [a[1], b[1]]


@pytest.fixture()
def one_thread():
    """Tiny tensors gain nothing from threads, and threads stall when the cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CASES = {
    "deformable": (dict(model="deformable"), 100),
    "deformable_refine_two_stage": (dict(model="deformable", with_box_refine=True, two_stage=True), 120),
    "detr": (dict(model="detr"), 150),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_overfit_two_images(case, one_thread):
    kwargs, steps = CASES[case]
    torch.manual_seed(0)
    model, criterion, post = build_model(num_classes=3, **kwargs, **TINY)
    images, mask, targets = _data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    first = None
    for _ in range(steps):
        loss = criterion.total_loss(criterion(model(images, mask), targets))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()

    model.eval()
    with torch.no_grad():
        out = model(images, mask)
        final = criterion.total_loss(criterion(out, targets)).item()
    assert final < first / 10, f"loss fell from {first:.3f} to {final:.3f} only"
    # every object is matched by a box with GIoU > 0.7 and the right class
    for b, (rows, cols) in enumerate(criterion.matcher(out, targets)):
        pred = box_convert(out["pred_boxes"][b, rows], "cxcywh", "xyxy")
        true = box_convert(targets[b]["boxes"][cols], "cxcywh", "xyxy")
        assert (generalized_box_iou(pred, true).diag() > 0.7).all()
        logits = out["pred_logits"][b, rows]
        if not post.focal:
            logits = logits[:, :-1]
        assert torch.equal(logits.argmax(-1), targets[b]["labels"][cols])
    # and after post-processing, the best detection of each object's class lies on it
    results = post(out, torch.tensor([[SIZE, SIZE]] * 2))
    for r, t in zip(results, targets):
        for label, box in zip(t["labels"], box_convert(t["boxes"] * SIZE, "cxcywh", "xyxy")):
            best = r["boxes"][r["labels"] == label][r["scores"][r["labels"] == label].argmax()]
            assert box_iou(best[None], box[None]).item() > 0.7
