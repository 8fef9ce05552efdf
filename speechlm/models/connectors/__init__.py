"""Modality connectors: encoder frames (B, L, T, D_enc) -> LLM input vectors (B, N, d_llm) with a mask."""

from speechlm.models.connectors.base import (
    Connector,
    ConnectorConfig,
    ConnectorOutput,
    ConvConfig,
    LayerFusion,
    QFormerConfig,
    SSRConfig,
    StackConfig,
    build_connector,
    connector_config_from_dict,
    load_connector,
)
from speechlm.models.connectors.fusion import HierarchicalFusion, make_layer_fusion

__all__ = [
    "Connector", "ConnectorConfig", "ConnectorOutput", "ConvConfig", "HierarchicalFusion", "LayerFusion",
    "QFormerConfig", "SSRConfig", "StackConfig", "build_connector", "connector_config_from_dict", "load_connector",
    "make_layer_fusion",
]
