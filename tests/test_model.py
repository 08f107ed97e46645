"""model.py: shapes, names, the two attention paths, masking, patchify, checkpoint hand-off."""
import os
import tempfile
import unittest

import torch

from model import ViT, create_vit, patchify, sincos_pos_embed, unpatchify
from weights import load_backbone, read_state_dict
from pretrain_mae import Config, MAEDecoder, random_masking


def small_vit(**kw):
    return ViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=10, **kw)


class TestViT(unittest.TestCase):
    def test_tiny_parameter_count(self):
        # the paper's "5.7M": 5,717,416 with a 1000-class head, 5,524,416 without (PAPER §1.1)
        n = sum(p.numel() for p in create_vit("tiny").parameters())
        self.assertEqual(n, 5_717_416)
        self.assertEqual(sum(p.numel() for p in create_vit("tiny", num_classes=0).parameters()), 5_524_416)

    def test_timm_parameter_names(self):
        keys = set(create_vit("tiny").state_dict())
        for k in ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.0.norm1.weight",
                  "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
                  "blocks.11.norm2.bias", "blocks.11.mlp.fc1.weight", "blocks.11.mlp.fc2.bias", "norm.weight",
                  "head.weight", "head.bias"]:
            self.assertIn(k, keys)
        self.assertEqual(len(keys), 4 + 12 * 12 + 2 + 2)

    def test_sdpa_equals_explicit_path_and_scores_have_grads(self):
        torch.manual_seed(0)
        model, x = small_vit(), torch.randn(3, 3, 16, 16)
        plain = model(x)
        logits, attns, hiddens = model(x, return_attn=True, return_hidden=True)
        torch.testing.assert_close(plain, logits, atol=1e-5, rtol=1e-5)
        self.assertEqual(len(attns), 2)
        self.assertEqual(attns[0].shape, (3, 4, 17, 17))  # (B, H, N, N), N = 16 patches + cls
        self.assertEqual(len(hiddens), 3)  # depth + 1
        probs = attns[-1].softmax(-1)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 17))
        probs[:, :, 0, 1].sum().backward()  # gradients flow back from the attention maps
        self.assertGreater(model.blocks[1].attn.qkv.weight.grad.abs().sum().item(), 0)

    def test_bad_image_size(self):
        with self.assertRaisesRegex(ValueError, "not divisible by patch size"):
            ViT(img_size=30, patch_size=4)

    def test_other_input_size_resizes_pos_embed(self):
        model = ViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=4, num_classes=0)
        self.assertEqual(model(torch.randn(2, 3, 8, 8)).shape, (2, 32))  # DINO local crops

    def test_sincos_is_fixed_and_cls_slot_zero(self):
        pe = sincos_pos_embed(32, 4)
        self.assertEqual(pe.shape, (1, 17, 32))
        self.assertTrue(torch.all(pe[0, 0] == 0))
        self.assertFalse(small_vit().pos_embed.requires_grad)
        self.assertTrue(small_vit(learn_pos_embed=True).pos_embed.requires_grad)


class TestMasking(unittest.TestCase):
    def test_patchify_roundtrip(self):
        x = torch.randn(2, 3, 16, 16)
        p = patchify(x, 4)
        self.assertEqual(p.shape, (2, 16, 48))
        torch.testing.assert_close(p[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).flatten())  # raster order, (p p C)
        torch.testing.assert_close(unpatchify(p, 4, 4), x)

    def test_exact_ratio_and_unshuffle(self):
        ids_keep, mask, ids_restore = random_masking(5, 196, 0.75, "cpu")
        self.assertEqual(ids_keep.shape, (5, 49))
        self.assertTrue(torch.all(mask.sum(1) == 147))
        self.assertEqual(mask.mean().item(), 0.75)
        for b in range(5):  # kept patches are exactly the unmasked ones
            self.assertTrue(torch.all(mask[b, ids_keep[b]] == 0))
        # [visible tokens, mask tokens] gathered with ids_restore give back the raster order
        tokens = torch.arange(196.0).expand(5, -1)
        visible = torch.gather(tokens, 1, ids_keep)
        full = torch.cat([visible, torch.full((5, 147), -1.0)], 1)
        restored = torch.gather(full, 1, ids_restore)
        torch.testing.assert_close(restored * (1 - mask), tokens * (1 - mask))
        self.assertTrue(torch.all(restored[mask.bool()] == -1))

    def test_bad_ratio(self):  # the Config refuses a ratio that keeps no patch or removes none, before masking
        for ratio in (1.0, 0.99, 0.0):
            with self.assertRaisesRegex(ValueError, "mask_ratio"):
                Config(img_size=16, patch_size=4, mask_ratio=ratio)

    def test_decoder_shapes(self):
        vit = ViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=4, num_classes=0)
        dec = MAEDecoder(4, 4, 3, 32, dim=24, depth=1, num_heads=3)
        ids_keep, mask, ids_restore = random_masking(2, 16, 0.75, "cpu")
        latent, _, _ = vit.forward_features(torch.randn(2, 3, 16, 16), ids_keep)
        self.assertEqual(latent.shape, (2, 5, 32))  # 4 visible + cls
        self.assertEqual(dec(latent, ids_restore).shape, (2, 16, 48))


class TestLoadBackbone(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.tmp.cleanup()

    def test_timm_vit_tiny_state_dict(self):
        # a timm vit_tiny_patch16_224 state dict: same names and shapes as ours (3 heads changes no shapes)
        sd = {k: torch.randn_like(v) for k, v in create_vit("tiny").state_dict().items()}
        sd = {"module." + k: v for k, v in sd.items()}  # as saved from DDP
        path = os.path.join(self.tmp.name, "timm.pth")
        torch.save(sd, path)
        model = create_vit("tiny", num_classes=37, global_pool=True, learn_pos_embed=True)
        missing, unexpected = load_backbone(model, path, verbose=False)
        self.assertEqual(sorted(missing), ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"])
        self.assertEqual(sorted(unexpected), ["norm.bias", "norm.weight"])
        torch.testing.assert_close(model.blocks[3].attn.qkv.weight, sd["module.blocks.3.attn.qkv.weight"])

    def test_pos_embed_interpolated_and_encoder_prefix(self):
        src = ViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=0)
        path = os.path.join(self.tmp.name, "mae.pt")
        sd = {"encoder." + k: v for k, v in src.state_dict().items()}
        sd["decoder.pred.weight"] = torch.zeros(1)
        torch.save({"model": sd, "epoch": 3}, path)
        self.assertNotIn("pred.weight", read_state_dict(path))
        dst = ViT(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)
        load_backbone(dst, path, verbose=False)
        self.assertEqual(dst.pos_embed.shape, (1, 65, 32))
        torch.testing.assert_close(dst.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)

    def test_architecture_mismatch_and_missing_file(self):
        path = os.path.join(self.tmp.name, "small.pt")
        torch.save(ViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4).state_dict(), path)
        with self.assertRaisesRegex(ValueError, "architecture mismatch"):
            load_backbone(ViT(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=4), path)
        with self.assertRaisesRegex(ValueError, "missing blocks.2"):
            load_backbone(ViT(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4), path)
        with self.assertRaisesRegex(FileNotFoundError, "checkpoint not found"):
            load_backbone(small_vit(), os.path.join(self.tmp.name, "nope.pt"))


if __name__ == "__main__":
    unittest.main()
