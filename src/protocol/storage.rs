//! `/v1/storage` wire types.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const MAX_PAGE: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collection {
    Tokens,
    ProxyConfigs,
    Audit,
    VaultConfig,
}

impl Collection {
    pub const ALL: [Collection; 4] = [
        Collection::Tokens,
        Collection::ProxyConfigs,
        Collection::Audit,
        Collection::VaultConfig,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tokens" => Some(Collection::Tokens),
            "proxy_configs" => Some(Collection::ProxyConfigs),
            "audit" => Some(Collection::Audit),
            "vault_config" => Some(Collection::VaultConfig),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Collection::Tokens => "tokens",
            Collection::ProxyConfigs => "proxy_configs",
            Collection::Audit => "audit",
            Collection::VaultConfig => "vault_config",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageRequest {
    pub request_id: Option<String>,
    pub operation: Option<String>,
    pub collection: Option<String>,
    pub collections: Option<Vec<String>>,
    pub key: Option<String>,
    pub data: Option<Value>,
    pub options: Option<ListOptions>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ListOptions {
    pub limit: Option<i64>,
    pub after: Option<String>,
    pub filters: Option<Map<String, Value>>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pagination {
    pub has_more: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    pub total_count: u64,
}

#[derive(Debug, Serialize)]
pub struct ListResult {
    pub items: Vec<Value>,
    pub pagination: Pagination,
}
