"""Config keys of ocz_d2, added to a Detectron2 ``CfgNode`` by :func:`add_ocz_config`.

Every key has a one-line comment: what it means and which values it takes. A test checks that
each key added here is read somewhere in the package or the tools.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["ConfigError", "add_ocz_config", "load_config"]


class ConfigError(ValueError):
    """A config file or a command-line override that does not fit the config's keys."""


def add_ocz_config(cfg: CN) -> None:
    """Add the ocz_d2 keys (``cfg.MODEL.OCZ``, input, solver and dataset extras) to ``cfg``."""
    _add_data_config(cfg)
    _add_model_config(cfg)
    _add_simzss_config(cfg)
    _add_solver_config(cfg)
    _add_test_vis_config(cfg)


def _add_test_vis_config(cfg: CN) -> None:
    """TEST extras: the test batch, predictions in TensorBoard during training."""
    # Images per model call in evaluation, per process (Detectron2 evaluates one at a time). The
    # model runs the images of one size in one forward, each at its own size (no padding), so
    # a metric does not depend on it beyond float rounding; more is faster where memory allows.
    cfg.TEST.IMS_PER_BATCH = 1
    # Every VIS_PERIOD-th evaluation in training (TEST.EVAL_PERIOD, and the final one) writes
    # pictures (input | ground truth | prediction, unseen classes outlined) of the first
    # VIS_NUM_IMAGES images of each DATASETS.TEST split to the event storage (TensorBoard,
    # "predictions/<dataset>/<i>"). >= 0; 0: off.
    cfg.TEST.VIS_PERIOD = 0
    # Images per test split in those pictures (>= 1).
    cfg.TEST.VIS_NUM_IMAGES = 3


def _add_data_config(cfg: CN) -> None:
    """DATASETS and INPUT extras."""
    _add_datasets_config(cfg)
    _add_input_config(cfg)


def _add_datasets_config(cfg: CN) -> None:
    """DATASETS: split files and the validation split(s)."""
    # YAML split files (see ocz_d2/data/split_file.py) registered before the datasets are built;
    # relative paths are resolved against the working directory.
    cfg.DATASETS.SPLIT_FILES = []
    # Validation split(s) on which tools/report.py and tools/demo.py tune test-time choices (the
    # calibration gamma); reported numbers come from DATASETS.TEST. () when there is none.
    cfg.DATASETS.VAL = ()


def _add_input_config(cfg: CN) -> None:
    """INPUT: the zero-shot setting and the training augmentations."""
    # Training setting: "inductive" (unseen pixels -> ignore, nothing else known about them; seen
    # vocabulary only) or "transductive" (ZegCLIP/OTSeg: unseen pixels are ignore in the labels
    # but the mapper keeps where they are; from MODEL.OCZ.SELF_TRAINING.START_ITER the unseen
    # names join the vocabulary and exactly those pixels get pseudo-labels; no calibration).
    cfg.INPUT.ZERO_SHOT_SETTING = "inductive"
    # Random rescale: the image is scaled to fit RESIZE_TARGET (h, w) times a factor drawn from
    # RESIZE_SCALE (min, max); RESIZE_SCALE = (1.0, 1.0) keeps the fitted size.
    cfg.INPUT.RESIZE_SCALE = (0.5, 2.0)
    # (height, width) that the random rescale fits the image into before scaling (mmseg: 512x2048).
    cfg.INPUT.RESIZE_TARGET = (512, 2048)
    # Crop: reuse cfg.INPUT.CROP.{ENABLED, SIZE}; a crop is redrawn (up to 10 times) while one
    # category covers more than this fraction of it (1.0 disables the constraint).
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.75
    # Photometric distortion (brightness, contrast, saturation, hue jitter) in training: bool.
    cfg.INPUT.COLOR_AUG = True
    # Horizontal flip probability in training (0 disables).
    cfg.INPUT.FLIP_PROB = 0.5
    # Pad images (with 0) and labels (with ignore) to a multiple of this; 0 disables.
    cfg.INPUT.SIZE_DIVISIBILITY = 0


def _add_model_config(cfg: CN) -> None:
    """MODEL.OCZ, one adder per node (and MODEL.SEM_SEG_HEAD.MASK_DIM with the pixel decoder)."""
    cfg.MODEL.OCZ = CN()
    ocz = cfg.MODEL.OCZ
    _add_clip_config(ocz)
    _add_resnet_config(ocz)
    _add_objects_config(ocz)
    _add_guide_config(ocz)
    _add_ora_config(ocz)
    _add_text_config(ocz)
    _add_pixel_decoder_config(cfg)
    _add_decoder_config(ocz)
    _add_loss_config(ocz)
    _add_split_config(ocz)
    _add_mfe_config(ocz)
    _add_self_training_config(ocz)
    _add_test_config(ocz)
    _add_segment_clip_config(ocz)


def _add_clip_config(ocz: CN) -> None:
    """MODEL.OCZ.CLIP: the CLIP backbone (MODEL.BACKBONE.NAME = "CLIPPromptBackbone")."""
    ocz.CLIP = CN()
    # open_clip model name ("ViT-B-16", ...) or a tiny config shipped with ocz_d2 ("OCZ-Tiny-ViT").
    ocz.CLIP.MODEL_NAME = "ViT-B-16"
    # open_clip pretrained tag (e.g. "openai"; downloads once) or "" for none (random weights).
    ocz.CLIP.PRETRAINED = ""
    # Local CLIP weights file (a state dict); used instead of PRETRAINED when set. Must exist.
    ocz.CLIP.WEIGHTS = ""
    # Number of deep visual prompt tokens per transformer layer (VPT-deep); 0 disables prompts.
    ocz.CLIP.NUM_PROMPTS = 10
    # Indices (0-based) of transformer layers whose patch tokens feed the pixel decoder.
    ocz.CLIP.OUT_LAYERS = [3, 5, 7, 11]
    # Keep CLIP's own weights frozen (only prompts train): bool.
    ocz.CLIP.FROZEN = True


def _add_resnet_config(ocz: CN) -> None:
    """MODEL.OCZ.RESNET: a trainable Detectron2 ResNet backbone (MODEL.BACKBONE.NAME =
    "build_resnet_backbone", shaped by MODEL.RESNETS.*; ZegFormer's), beside which the model
    builds the frozen CLIP of MODEL.OCZ.CLIP for the class names and the segment route."""
    ocz.RESNET = CN()
    # Initial weights of that ResNet, loaded when the model is built: a local file in
    # Detectron2's format (.pkl from its model zoo or convert-torchvision-to-d2, or a .pth state
    # dict; a relative path is looked up in the working directory, then under
    # $DETECTRON2_DATASETS; it must exist) or a URL (e.g.
    # "detectron2://ImageNetPretrained/MSRA/R-101.pkl", downloaded once). "": random (from
    # scratch). A trained checkpoint (MODEL.WEIGHTS) replaces them.
    ocz.RESNET.WEIGHTS = ""


def _add_objects_config(ocz: CN) -> None:
    """MODEL.OCZ.OBJECTS: OC-ZSS objects, object prompts guided by regions
    (ocz_d2/modeling/backbone)."""
    ocz.OBJECTS = CN()
    # n_o, objects (regions) per image: object prompts in CLIP and ORA's object slots; 0 disables
    # both (6 for VOC/COCO, 8 for Context in OC-ZSS).
    ocz.OBJECTS.NUM = 0
    # Object prompts in the CLIP backbone, tied to the guide's regions: bool. False with NUM > 0
    # is the "ORA with random object init" ablation (no guide is used then).
    ocz.OBJECTS.PROMPTS = True


def _add_guide_config(ocz: CN) -> None:
    """MODEL.OCZ.GUIDE: the guide that splits each image into n_o regions (object maps override
    it)."""
    ocz.GUIDE = CN()
    # "ssl" (cluster a frozen timm ViT's patch features), "clip" (cluster the frozen CLIP's own
    # patch features) or "oracle" (only precomputed object maps, e.g. true instance maps).
    ocz.GUIDE.SOURCE = "ssl"
    # timm ViT name of the "ssl" guide (e.g. "vit_base_patch16_224.dino", "vit_tiny_patch16_224").
    ocz.GUIDE.SSL_MODEL = "vit_base_patch16_224.dino"
    # Download timm's pretrained weights for SSL_MODEL (when WEIGHTS is ""): bool. False gives a
    # randomly initialised ViT (seeded by GUIDE.SEED).
    ocz.GUIDE.PRETRAINED = True
    # Local weights file of the SSL model (timm state dict); wins over PRETRAINED. Must exist.
    ocz.GUIDE.WEIGHTS = ""
    # Longer image side fed to the SSL model, in pixels; 0 keeps the image's size.
    ocz.GUIDE.INPUT_SIZE = 0
    # Seed selection of the Voronoi clustering: "farthest" or "kmeans++".
    ocz.GUIDE.SEEDING = "farthest"
    # k-means refinement steps after the Voronoi assignment (0: plain Voronoi cells).
    ocz.GUIDE.KMEANS_ITERS = 3
    # Seed of the clustering's random draws (and of a random SSL model's weights).
    ocz.GUIDE.SEED = 0


def _add_ora_config(ocz: CN) -> None:
    """MODEL.OCZ.ORA: Object Refinement Attention between the backbone and the pixel pyramid."""
    ocz.ORA = CN()
    # S, rounds of (object stage, patch stage); 0 disables ORA (4 for VOC/COCO, 5 for Context).
    ocz.ORA.NUM_ROUNDS = 0
    # ORA's own width: patch and object features are projected to it on entry and the change
    # is projected back and added (zero-initialised exit: a narrow ORA starts as the identity).
    # 0: the ViT's width, no projections (the literal reading of the paper; 9x the cost of 256
    # for a ViT-B at 512x512, see BENCHMARKS.md). ORA refines the last of
    # MODEL.SEM_SEG_HEAD.IN_FEATURES.
    ocz.ORA.DIM = 256
    # Attention heads of both stages (must divide ORA's width).
    ocz.ORA.NHEADS = 8
    # Initial object features: "prompts" (object-prompt outputs; needs OBJECTS.PROMPTS) or
    # "random" (learned embeddings, randomly initialised; needs OBJECTS.PROMPTS False).
    ocz.ORA.OBJECT_INIT = "prompts"
    # Granular attention: multi-receptive-field K/V (object stage) and Q (patch stage): bool.
    ocz.ORA.GRANULAR = False
    # Dilation rates of granular attention's depth-wise 3x3 branches.
    ocz.ORA.GRANULAR_RATES = [1, 3, 6, 9]


def _add_text_config(ocz: CN) -> None:
    """MODEL.OCZ.TEXT: the text side, class-name embeddings."""
    ocz.TEXT = CN()
    # Prompt templates: "single" ("a photo of a {}."), "imagenet" (ocz_d2's template ensemble),
    # "zegformer_single" ("A photo of a {} in the scene") or "imagenet_select" (ZegFormer's 8).
    ocz.TEXT.TEMPLATES = "single"
    # File of precomputed class embeddings (.npz with "classes" and "embeddings"); when set it
    # replaces the text encoder for every dataset. "" uses the dataset's own file, if its
    # metadata names one, else the CLIP text encoder.
    ocz.TEXT.EMBEDDINGS_FILE = ""
    # Number of prompts encoded per text-encoder call (memory bound for large vocabularies).
    ocz.TEXT.CHUNK_SIZE = 256


def _add_pixel_decoder_config(cfg: CN) -> None:
    """The pixel decoder (MODEL.SEM_SEG_HEAD.NAME): MODEL.SEM_SEG_HEAD.MASK_DIM and
    MODEL.OCZ.PIXEL_DECODER; it also uses MODEL.SEM_SEG_HEAD.{IN_FEATURES, CONVS_DIM, NORM}."""
    ocz = cfg.MODEL.OCZ
    # Channels of the mask features (the space query mask embeddings are compared in).
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    # The pixel decoder's OCZ extras:
    ocz.PIXEL_DECODER = CN()
    # Output strides of the feature pyramid given to the transformer decoder, coarse to fine.
    ocz.PIXEL_DECODER.DECODER_STRIDES = [32, 16, 8]
    # Stride of the mask features (4 or 8).
    ocz.PIXEL_DECODER.MASK_STRIDE = 4
    ocz.PIXEL_DECODER.IMAGE_PATH = CN()
    # The miniature's light high-resolution path from the image (pixel_decoder/image_path.py):
    # stage widths, stage i at stride 2**(i+1); its outputs at pyramid strides are added to those
    # levels. Empty: off (every paper-scale config; no reproduced method has it).
    ocz.PIXEL_DECODER.IMAGE_PATH.WIDTHS = []
    # Stride-1 3x3 convs of each stage after its stride-2 conv (one count per WIDTHS entry, each
    # >= 0); empty: one each.
    ocz.PIXEL_DECODER.IMAGE_PATH.DEPTHS = []
    # MaskFormerPixelDecoder (ZegFormer's): the backbone feature the query decoder attends to
    # (MaskFormer's TRANSFORMER_IN_FEATURE, "res5"); one of MODEL.SEM_SEG_HEAD.IN_FEATURES.
    ocz.PIXEL_DECODER.TRANSFORMER_IN_FEATURE = "res5"


def _add_decoder_config(ocz: CN) -> None:
    """MODEL.OCZ.DECODER: the transformer decoder."""
    ocz.DECODER = CN()
    # Registered name in ocz_d2's TRANSFORMER_DECODER_REGISTRY: "ZeroShotMaskDecoder" (ours,
    # Mask2Former-style) or "ZegFormerDecoder" (ZegFormer's: a DETR decoder on one feature map,
    # fixed logit scale, unnormalised background embedding).
    ocz.DECODER.NAME = "ZeroShotMaskDecoder"
    # The miniature's option: each query's class embedding also gets its mask-pooled mask
    # features (projected), a direct path from pixel features to the class. Off in every
    # paper-scale config (no reproduced method has it).
    ocz.DECODER.MASK_POOLING = False
    # Total number of queries.
    ocz.DECODER.NUM_QUERIES = 100
    # Width of the decoder.
    ocz.DECODER.HIDDEN_DIM = 256
    # Attention heads.
    ocz.DECODER.NHEADS = 8
    # Hidden width of the feed-forward blocks.
    ocz.DECODER.DIM_FEEDFORWARD = 2048
    # Number of decoder layers (each yields a prediction for deep supervision).
    ocz.DECODER.DEC_LAYERS = 6
    # Dropout in attention and feed-forward blocks (ZegFormerDecoder: 0.1, DETR's).
    ocz.DECODER.DROPOUT = 0.0
    # Pre-norm (True) or post-norm (False) blocks.
    ocz.DECODER.PRE_NORM = False
    # Mask each query's cross-attention to its predicted mask (Mask2Former): bool
    # (ZeroShotMaskDecoder only).
    ocz.DECODER.MASKED_ATTENTION = True
    # Temperature of the class logits (logits = scale * cosine): ZeroShotMaskDecoder's initial
    # value, learned in log space (at most 100); ZegFormerDecoder's fixed value (100).
    ocz.DECODER.LOGIT_SCALE = 50.0


def _add_loss_config(ocz: CN) -> None:
    """MODEL.OCZ.LOSS: losses and matching."""
    ocz.LOSS = CN()
    # Weight of the classification loss (and of the class cost in matching).
    ocz.LOSS.CLASS_WEIGHT = 2.0
    # Weight of the mask loss (and cost) chosen by MASK_LOSS.
    ocz.LOSS.MASK_WEIGHT = 5.0
    # Mask loss and cost on the sampled points: "bce" (sigmoid binary cross-entropy,
    # Mask2Former) or "focal" (sigmoid focal loss, MaskFormer and ZegFormer; FOCAL_ALPHA/GAMMA).
    ocz.LOSS.MASK_LOSS = "bce"
    # Focal loss: weight of the positive points, in [0, 1] (the negatives take 1 - alpha);
    # -1 weighs both alike.
    ocz.LOSS.FOCAL_ALPHA = 0.25
    # Focal loss: exponent of the modulating factor (1 - p_t) (>= 0; 0 gives alpha-weighted BCE).
    ocz.LOSS.FOCAL_GAMMA = 2.0
    # Weight of the dice loss (and cost).
    ocz.LOSS.DICE_WEIGHT = 5.0
    # The miniature's option: weight of an auxiliary per-pixel cross-entropy on the mask
    # features' class logits (their projection to the text space against the vocabulary; the
    # dense supervision DenseCLIP adds), over annotated pixels. 0: off, and no projection is
    # built (every paper-scale config).
    ocz.LOSS.PIXEL_WEIGHT = 0.0
    # Its pixels: 0, every annotated pixel (the logits upsampled to the label's size); P > 0, P
    # points per image drawn uniformly over its annotated pixels (cheaper; an unbiased estimate).
    ocz.LOSS.PIXEL_NUM_POINTS = 0
    # Relative weight of the no-object class in the classification loss. Seen queries: class
    # weight in the weighted mean over their targets (Mask2Former). Candidate queries
    # (SPLIT.NUM_CANDIDATES > 0), whose class terms are all no-object: the weighted sum is divided
    # by the number of candidate queries (matched ones included), so loss_cand_ce scales with it.
    ocz.LOSS.NO_OBJECT_WEIGHT = 0.1
    # Teach no-object to unmatched queries whose predicted mask lies mostly on ignore pixels
    # (True, Mask2Former) or leave their class free (False): ignore pixels hold unseen objects.
    ocz.LOSS.NO_OBJECT_ON_IGNORE = True
    # Add the losses of every intermediate decoder layer: bool.
    ocz.LOSS.DEEP_SUPERVISION = True
    # Points sampled per mask for matching costs and mask losses (from valid, non-ignore pixels).
    ocz.LOSS.TRAIN_NUM_POINTS = 12544
    # Oversampling ratio of candidate points for uncertainty-based point selection (>= 1).
    ocz.LOSS.OVERSAMPLE_RATIO = 3.0
    # Fraction of points chosen by uncertainty; the rest are uniform over valid pixels.
    ocz.LOSS.IMPORTANCE_SAMPLE_RATIO = 0.75


def _add_split_config(ocz: CN) -> None:
    """MODEL.OCZ.SPLIT: split matching (Split Matching; docs/DESIGN.md, "Split matching")."""
    ocz.SPLIT = CN()
    # N_c, candidate queries: the last N_c of DECODER.NUM_QUERIES, matched to pseudo-masks of the
    # unannotated pixels; the first NUM_QUERIES - N_c (seen queries) to the ground truth.
    # 0 = standard matching of all queries to the ground truth (no pseudo-masks computed).
    ocz.SPLIT.NUM_CANDIDATES = 0
    # Clusters of CLIP's dense features over the unannotated patches of an image.
    ocz.SPLIT.NUM_REGIONS = 8
    # Smallest kept pseudo-mask, as a fraction of the image's pixels.
    ocz.SPLIT.MIN_AREA = 0.01
    # Seed selection of that clustering: "farthest" or "kmeans++" (see MODEL.OCZ.GUIDE.SEEDING).
    ocz.SPLIT.SEEDING = "kmeans++"
    # k-means refinement steps of that clustering.
    ocz.SPLIT.KMEANS_ITERS = 3
    # Seed of that clustering's random draws (the same every step: deterministic targets).
    ocz.SPLIT.SEED = 0
    # CLIP features the pseudo-masks and their region embeddings come from: "prompted" (the
    # training pass, which moves as the prompts train) or "plain" (a frozen prompt-free pass:
    # fixed targets, one extra CLIP forward without gradients per step).
    ocz.SPLIT.TARGET_FEATURES = "prompted"
    # Weight of -cos(query class embedding, region embedding) in the candidate matching cost.
    ocz.SPLIT.EMBED_COST = 2.0
    # Candidate losses (keys loss_cand_*): no-object CE of the unmatched candidates (weight
    # LOSS.CLASS_WEIGHT; no-object class weight LOSS.NO_OBJECT_WEIGHT), and for matched ones:
    # mask BCE against the pseudo-mask (weight, also of its matching cost) ...
    ocz.SPLIT.MASK_WEIGHT = 5.0
    # ... dice against the pseudo-mask (weight, also of its matching cost) ...
    ocz.SPLIT.DICE_WEIGHT = 5.0
    # ... and the alignment 1 - cos(query class embedding, region embedding) (weight).
    ocz.SPLIT.EMBED_WEIGHT = 2.0


def _add_mfe_config(ocz: CN) -> None:
    """MODEL.OCZ.MFE: multi-scale feature enhancement (Split Matching's MFE)."""
    ocz.MFE = CN()
    # Refine every pixel-decoder output level with a residual multi-receptive-field block: bool.
    ocz.MFE.ENABLED = False
    # Dilation rates of its depth-wise 3x3 branches (plus a global-pool branch).
    ocz.MFE.RATES = [1, 2, 3]


def _add_self_training_config(ocz: CN) -> None:
    """MODEL.OCZ.SELF_TRAINING: transductive self-training (INPUT.ZERO_SHOT_SETTING
    "transductive")."""
    ocz.SELF_TRAINING = CN()
    # Iteration from which the pixels whose ground truth is an unseen class (known to be unseen,
    # class hidden) get pseudo-labels, the argmax over unseen classes of the current prediction,
    # and the unseen names join the training vocabulary; before it, training is inductive (seen
    # vocabulary). Background, boundaries and padding stay ignored. Read from Detectron2's event
    # storage.
    ocz.SELF_TRAINING.START_ITER = 0
    # Least confidence of a pseudo-label: the unseen class's probability at the pixel (the
    # mask-weighted class distribution of the queries, no-object included); below it the pixel
    # stays ignore. 0 labels every unseen-class pixel (ZegCLIP/OTSeg).
    ocz.SELF_TRAINING.THRESHOLD = 0.0


def _add_test_config(ocz: CN) -> None:
    """MODEL.OCZ.TEST: inference."""
    ocz.TEST = CN()
    # Calibration gamma subtracted from seen-class scores at test time (inductive: 0.1).
    ocz.TEST.CALIBRATION = 0.1
    # Gammas tried on DATASETS.VAL by the tuned protocol (ocz_d2/evaluation/protocol.py); the one
    # with the highest val hIoU is used on DATASETS.TEST.
    ocz.TEST.CALIBRATION_GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    # "whole" (one forward per image) or "slide" (sliding window, logits averaged).
    ocz.TEST.MODE = "whole"
    # Sliding-window crop size (h, w) in input pixels.
    ocz.TEST.WINDOW_SIZE = (512, 512)
    # Sliding-window stride (h, w).
    ocz.TEST.WINDOW_STRIDE = (426, 426)
    # Sliding windows of one image per forward pass (>= 0): 0 = all of them in one batch; n > 0
    # caps the batch (memory). The scores do not depend on it.
    ocz.TEST.SLIDE_BATCH = 0
    # ZeroShotPredictor (tools/segment.py): vocabularies whose text embeddings are kept, least
    # recently used dropped first (>= 0; 0 keeps none).
    ocz.TEST.VOCABULARY_CACHE_SIZE = 8
    # ZeroShotPredictor (tools/segment.py, tools/web_demo.py): images of more pixels (height x
    # width, before the test resize) are refused with an error (>= 0; 0: no limit).
    ocz.TEST.MAX_IMAGE_PIXELS = 0


def _add_segment_clip_config(ocz: CN) -> None:
    """MODEL.OCZ.SEGMENT_CLIP: test-time CLIP classification of segments (ZegFormer's decoupled
    route; inference only, no parameters: ocz_d2/modeling/segment_classifier.py)."""
    ocz.SEGMENT_CLIP = CN()
    # Classify each query's segment again with the frozen CLIP and ensemble it with the
    # decoder's classes at inference: bool (training and checkpoints are unchanged).
    ocz.SEGMENT_CLIP.ENABLED = False
    # "region" (one extra prompt-free CLIP pass; its CLS token attends only to the segment's
    # patches in the last block) or "crop" (ZegFormer: one CLIP forward per segment on its crop).
    ocz.SEGMENT_CLIP.ROUTE = "region"
    # Crop route's input: "cropmask" (the mask's box, pixels outside the mask at CLIP's mean
    # colour), "crop" (the box, unmasked) or "mask" (the masked whole image, no crop).
    ocz.SEGMENT_CLIP.STYLE = "cropmask"
    # lambda in [0, 1] of the geometric ensemble: seen classes p_dec^lambda * p_clip^(1-lambda),
    # other classes (all of an open vocabulary) p_dec^(1-lambda) * p_clip^lambda.
    ocz.SEGMENT_CLIP.LAMBDA = 2.0 / 3.0
    # Replace CLIP's seen-class probabilities by their mean over the seen classes (ZegFormer): bool.
    ocz.SEGMENT_CLIP.SEEN_MEAN = False
    # Queries whose decoder no-object probability exceeds this keep the decoder's classes only
    # (the crop route then skips their CLIP forward); 0 = off, every query is classified.
    ocz.SEGMENT_CLIP.SKIP_NO_OBJECT = 0.0
    # Temperature of CLIP's class logits, LOGIT_SCALE * cos(segment, class embedding) (> 0;
    # CLIP's own is 100).
    ocz.SEGMENT_CLIP.LOGIT_SCALE = 100.0


def _add_simzss_config(cfg: CN) -> None:
    """MODEL.SIMZSS: the SimZSS meta-architecture (MODEL.META_ARCHITECTURE "SimZSS"; a frozen
    vision tower, a trained text tower, captions; ocz_d2/modeling/meta_arch/simzss.py)."""
    cfg.MODEL.SIMZSS = CN()
    simzss = cfg.MODEL.SIMZSS
    _add_simzss_vision_config(simzss)
    _add_simzss_text_config(simzss)
    _add_simzss_concepts_config(simzss)
    _add_simzss_loss_config(simzss)
    _add_simzss_test_config(simzss)


def _add_simzss_vision_config(simzss: CN) -> None:
    """MODEL.SIMZSS.VISION: the frozen vision tower."""
    simzss.VISION = CN()
    # "timm" (a self-supervised timm ViT, e.g. DINO / DINOv2) or "clip" (the image tower of an
    # open_clip model, MODEL.OCZ.CLIP.{MODEL_NAME, PRETRAINED, WEIGHTS}; its tokens through
    # ln_post and the projection).
    simzss.VISION.SOURCE = "timm"
    # timm model name of the "timm" tower (DINOv2 ViT-B/14 with registers by default;
    # "vit_base_patch16_224.dino", "vit_small_patch14_reg4_dinov2.lvd142m" ... also work).
    simzss.VISION.MODEL_NAME = "vit_base_patch14_reg4_dinov2.lvd142m"
    # Download timm's weights for MODEL_NAME when WEIGHTS is "": bool. False: random weights.
    simzss.VISION.PRETRAINED = True
    # Local timm state-dict file of the "timm" tower; wins over PRETRAINED. Must exist.
    simzss.VISION.WEIGHTS = ""


def _add_simzss_text_config(simzss: CN) -> None:
    """MODEL.SIMZSS.TEXT: the trained text tower (open_clip's text transformer)."""
    simzss.TEXT = CN()
    # open_clip model whose text tower (and tokenizer) is used, e.g. "ViT-B-16", "OCZ-Tiny-ViT".
    simzss.TEXT.MODEL_NAME = "ViT-B-16"
    # open_clip pretrained tag to start the text tower from (downloads once); "" for none.
    simzss.TEXT.PRETRAINED = ""
    # Local open_clip state-dict file to start the text tower from; wins over PRETRAINED. ""
    # with PRETRAINED "" gives a randomly initialised text tower.
    simzss.TEXT.WEIGHTS = ""
    # Projection of the text tokens to the vision width: "linear" (a new trained linear map from
    # the text transformer's width) or "clip" (the checkpoint's own text projection; its output
    # width must equal the vision tower's, e.g. SOURCE "clip" with the same CLIP).
    simzss.TEXT.PROJECTION = "linear"


def _add_simzss_concepts_config(simzss: CN) -> None:
    """MODEL.SIMZSS.CONCEPTS: noun phrases of the captions (ocz_d2/data/concepts.py)."""
    simzss.CONCEPTS = CN()
    # Concept bank file for every training dataset; "" uses each caption split file's
    # concept_bank (no bank: captions train the global loss only).
    simzss.CONCEPTS.BANK = ""
    # "auto" (spaCy noun chunks filtered by the bank when spaCy and SPACY_PIPELINE load, else
    # the matcher), "matcher" (bank phrases in any word order, plurals reduced; no model) or
    # "spacy" (required).
    simzss.CONCEPTS.EXTRACTOR = "auto"
    # spaCy pipeline of the "spacy" extractor.
    simzss.CONCEPTS.SPACY_PIPELINE = "en_core_web_sm"


def _add_simzss_loss_config(simzss: CN) -> None:
    """MODEL.SIMZSS.LOSS: the global and the concept losses."""
    simzss.LOSS = CN()
    # Initial temperature of the global InfoNCE logits (learned in log space, at most 100).
    simzss.LOSS.GLOBAL_LOGIT_SCALE = 1.0 / 0.07
    # lambda, weight of the concept loss (0 disables it).
    simzss.LOSS.CONCEPT_WEIGHT = 0.05
    # Fixed scale of the concept classification logits (1 / 0.07).
    simzss.LOSS.CONCEPT_SCALE = 1.0 / 0.07
    # tau of the softmax over patches that pools a visual concept (> 0).
    simzss.LOSS.POOL_TEMPERATURE = 0.1
    # Target of a visual concept: "own" (the concept's own id; the paper) or "argmax" (the
    # highest-scoring concept among those in the batch; the released code).
    simzss.LOSS.CONCEPT_TARGET = "own"


def _add_simzss_test_config(simzss: CN) -> None:
    """MODEL.SIMZSS.TEST: dense inference (MODEL.OCZ.TEST.{MODE, WINDOW_SIZE, WINDOW_STRIDE,
    SLIDE_BATCH} and MODEL.OCZ.TEXT.{TEMPLATES, CHUNK_SIZE} apply too)."""
    simzss.TEST = CN()
    # Background rule for a vocabulary holding BACKGROUND_CLASS: "none" (it is scored like any
    # class), "threshold" (its score is BACKGROUND_THRESHOLD: pixels whose best class cosine is
    # lower become background) or "prompt" (its score is the cosine with BACKGROUND_PROMPTS).
    simzss.TEST.BACKGROUND = "none"
    # Name of the background class in a dataset's classes.
    simzss.TEST.BACKGROUND_CLASS = "background"
    # Cosine threshold of the "threshold" rule.
    simzss.TEST.BACKGROUND_THRESHOLD = 0.2
    # Thresholds tried on DATASETS.VAL by the tuned protocol (rule "threshold"); the best val
    # mIoU wins.
    simzss.TEST.BACKGROUND_THRESHOLD_GRID = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]
    # Phrases embedded (averaged) as the background class by the "prompt" rule.
    simzss.TEST.BACKGROUND_PROMPTS = ["background"]
    # Refine the upsampled scores with PAMR (pixel-adaptive mask refinement): bool.
    simzss.TEST.PAMR = False
    # PAMR iterations.
    simzss.TEST.PAMR_ITERS = 10
    # PAMR dilations of its 3x3 neighbourhood.
    simzss.TEST.PAMR_DILATIONS = [1, 2]


def _add_solver_config(cfg: CN) -> None:
    """SOLVER extras: the optimizer, the poly schedule, LR multipliers, checkpoints kept."""
    # "ADAMW" or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Exponent of the poly schedule (LR_SCHEDULER_NAME = "WarmupPolyLR").
    cfg.SOLVER.POLY_LR_POWER = 0.9
    # LR multiplier of the trainable backbone parameters (module prefix "backbone."): the visual
    # and object prompts of the CLIP backbone (OC-ZSS configs: 10, OTSeg's and ZegCLIP's), or a
    # CNN backbone's weights (ZegFormer configs: 0.1).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    # LR multiplier of the heads (pixel decoder, transformer decoder): ZegCLIP-style x10.
    cfg.SOLVER.HEAD_MULTIPLIER = 10.0
    # Weight decay of normalisation layers, embeddings and prompts.
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Periodic checkpoints (model_NNNNNNN.pth) kept on disk, the newest; 0 keeps all.
    cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP = 0


def load_config(config_file: str | os.PathLike | None, opts: Sequence[str] = ()) -> CN:
    """Detectron2's defaults, the ocz_d2 keys, a YAML config file and ``KEY VALUE`` overrides.

    Args:
        config_file: YAML config (``_BASE_`` chains are followed), or None for the defaults.
        opts: command-line overrides, ``[KEY, VALUE, KEY, VALUE, ...]``.

    Returns:
        The merged config (not frozen).

    Raises:
        ConfigError: on a missing file, an unknown key (close spellings are suggested), an odd
            number of overrides or a value of the wrong type; the message names the key.
    """
    cfg = get_cfg()
    add_ocz_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file {os.fspath(config_file)!r} does not exist")
        try:
            cfg.merge_from_file(os.fspath(config_file))
        except KeyError as e:
            key = _key_in_message(str(e.args[0]))
            raise ConfigError(
                f"{e.args[0]} (in {os.fspath(config_file)} or its _BASE_ files).{_hint(cfg, key)}"
            ) from None
    opts = [str(x) for x in opts]
    if len(opts) % 2:
        raise ConfigError(f"overrides come in KEY VALUE pairs; got {len(opts)} words: {opts}")
    for key in opts[::2]:
        if not _has_key(cfg, key):
            raise ConfigError(f"unknown config key {key!r} on the command line.{_hint(cfg, key)}")
    try:
        cfg.merge_from_list(opts)
    except (ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f"command-line override: {e}") from None
    return cfg


def _has_key(cfg: CN, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CN) or part not in node:
            return False
        node = node[part]
    return True


def _all_keys(node: CN, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        keys.extend(_all_keys(v, f"{prefix}{k}.") if isinstance(v, CN) else [prefix + k])
    return keys


def _key_in_message(message: str) -> str:
    found = re.findall(r"[A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)+", message)
    return found[-1] if found else ""


def _hint(cfg: CN, key: str) -> str:
    close = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.8) if key else []
    where = " ocz_d2's keys and their meaning are in ocz_d2/config.py."
    return (f" Did you mean {' or '.join(close)}?" if close else "") + where
