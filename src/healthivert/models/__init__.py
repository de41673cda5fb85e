"""Networks of HealthiVert-GAN: generator (coarse + fine, SHRM), discriminators, fracture classifier."""

from healthivert.models.classifier import FractureClassifier
from healthivert.models.complexity import flops_per_sample, param_count
from healthivert.models.contextual_attention import ContextualAttention
from healthivert.models.discriminator import Discriminators, PatchDiscriminator
from healthivert.models.generator import (CoarseGenerator, FineGenerator, GeneratorOutput, HealthiVertGenerator,
                                          HeightHead)
from healthivert.models.gradcam import attention_maps
from healthivert.models.io import (generator_file, load_classifier, load_generator, load_view_generator,
                                   read_saved_model, save_classifier, save_generator, view_file_name)

__all__ = ["CoarseGenerator", "ContextualAttention", "Discriminators", "FineGenerator", "FractureClassifier",
           "GeneratorOutput", "HealthiVertGenerator", "HeightHead", "PatchDiscriminator", "attention_maps",
           "flops_per_sample", "generator_file", "load_classifier", "load_generator", "load_view_generator",
           "param_count",
           "read_saved_model", "save_classifier", "save_generator", "view_file_name"]
