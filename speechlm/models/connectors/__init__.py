"""Modality connectors: encoder frames (B, L, T, D_enc) -> LLM input vectors (B, N, d_llm) with a mask."""

# The four connector modules register their classes with base.Connector when imported (base imports none
# of them), so that build_connector / load_connector find every connector once this package is imported.
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
from speechlm.models.connectors.conv import ConvConnector
from speechlm.models.connectors.fusion import HierarchicalFusion, make_layer_fusion
from speechlm.models.connectors.qformer import QFormerConnector
from speechlm.models.connectors.ssr import SSRConnector
from speechlm.models.connectors.stack import StackConnector

__all__ = [
    "Connector", "ConnectorConfig", "ConnectorOutput", "ConvConfig", "ConvConnector", "HierarchicalFusion",
    "LayerFusion", "QFormerConfig", "QFormerConnector", "SSRConfig", "SSRConnector", "StackConfig", "StackConnector",
    "build_connector", "connector_config_from_dict", "load_connector", "make_layer_fusion",
]
