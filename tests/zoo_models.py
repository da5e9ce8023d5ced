"""Models that symbolic tracing cannot take whole: torchvision detection and optical flow,
Hugging Face transformers built from small configs (no download), timm families.

``build(name) -> (model, example_inputs)`` gives a seeded model at random weights in eval
mode, with BatchNorm statistics of its own activations (as a trained model has) and small
inputs.  Used by tests/plugin/fx/test_zoo.py.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

#: torchvision models of issue 12 (detection, optical flow)
TORCHVISION = ["ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
               "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn",
               "keypointrcnn_resnet50_fpn", "raft_small"]
#: transformers models, from small configs
TRANSFORMERS = ["BertModel", "ViTModel", "ConvNextModel", "SegformerForSemanticSegmentation",
                "DetrForObjectDetection", "Swinv2Model"]
#: timm models of issue 12
TIMM = ["tf_efficientnetv2_b0", "mobilevit_xxs", "mobilevitv2_050", "tiny_vit_5m_224"]


def _settle_batchnorm(model: nn.Module, inputs: tuple) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    # detection models need targets in train mode: set only the BNs to train mode
    model.eval()
    for bn in bns:
        bn.train()
    with torch.no_grad():
        model(*inputs)
    model.eval()


def _torchvision(name: str) -> tuple[nn.Module, tuple]:
    import torchvision

    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None}
    if name == "raft_small":
        kwargs = {"weights": None}
        model = torchvision.models.get_model(name, **kwargs)
        x = (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))
        return model, x + (3,)  # num_flow_updates
    if name.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn", "retinanet", "fcos")):
        kwargs.update(min_size=160, max_size=160)
        # few proposals and detections, none dropped by score (random weights score low):
        # every head (masks, keypoints) runs on the example
        if "rcnn" in name:
            kwargs.update(rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20,
                          box_detections_per_img=5, box_score_thresh=0.0)
        else:
            kwargs.update(detections_per_img=5, topk_candidates=50, score_thresh=0.0)
        if name.startswith("keypointrcnn"):
            kwargs["num_keypoints"] = 5
    if name.startswith("ssdlite"):
        kwargs.update(detections_per_img=5, topk_candidates=50, score_thresh=0.0)
    model = torchvision.models.get_model(name, **kwargs)
    return model, ([torch.rand(3, 160, 160), torch.rand(3, 160, 160)],)


def _transformers(name: str) -> tuple[nn.Module, tuple]:
    import transformers as tf

    ids = torch.randint(0, 100, (2, 8))
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}
    if name == "BertModel":
        cfg = tf.BertConfig(vocab_size=100, max_position_embeddings=16, **small)
        return tf.BertModel(cfg), (ids,)
    if name == "ViTModel":
        cfg = tf.ViTConfig(image_size=32, patch_size=8, **small)
        return tf.ViTModel(cfg), (torch.randn(2, 3, 32, 32),)
    if name == "ConvNextModel":
        cfg = tf.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1])
        return tf.ConvNextModel(cfg), (torch.randn(2, 3, 64, 64),)
    if name == "SegformerForSemanticSegmentation":
        cfg = tf.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                 hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                                 patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
                                 decoder_hidden_size=32, num_labels=4)
        return tf.SegformerForSemanticSegmentation(cfg), (torch.randn(2, 3, 64, 64),)
    if name == "DetrForObjectDetection":
        cfg = tf.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                            backbone_config=tf.ResNetConfig(
                                hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                embedding_size=8, out_features=["stage4"]),
                            d_model=32, encoder_layers=1, decoder_layers=1,
                            encoder_attention_heads=2, decoder_attention_heads=2,
                            encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
                            num_labels=4)
        return tf.DetrForObjectDetection(cfg), (torch.randn(2, 3, 64, 64),)
    if name == "Swinv2Model":
        cfg = tf.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                              num_heads=[1, 2], window_size=4)
        return tf.Swinv2Model(cfg), (torch.randn(2, 3, 32, 32),)
    raise KeyError(name)


def _timm(name: str) -> tuple[nn.Module, tuple]:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=10)
    cfg = model.pretrained_cfg
    size = cfg.get("input_size", (3, 224, 224))[-1]
    fixed = cfg.get("fixed_input_size", False) or name.startswith(("tiny_vit", "swin"))
    if not fixed:
        size = min(size, 96)
    return model, (torch.randn(2, 3, size, size),)


BUILDERS: dict[str, Callable[[str], tuple[nn.Module, tuple]]] = {
    **{n: _torchvision for n in TORCHVISION}, **{n: _transformers for n in TRANSFORMERS},
    **{n: _timm for n in TIMM}}


def build(name: str) -> tuple[nn.Module, tuple]:
    """``(model, example_inputs)`` for ``name`` (seeded, random weights, eval mode)."""
    torch.manual_seed(0)
    builder = BUILDERS.get(name, _timm)
    model, inputs = builder(name)
    for mod in model.modules():  # zero-initialized heads give zero outputs
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and not mod.weight.any():
            nn.init.normal_(mod.weight, std=0.02)
    _settle_batchnorm(model, inputs)
    return model.eval(), inputs
