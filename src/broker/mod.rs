//! Brokering: using credentials on the caller's behalf (the MCP proxy) and
//! keeping them fresh (both refresh flows).

pub mod oauth;
pub mod proxy;
pub mod refresh;

pub struct Broker {
    pub proxy: proxy::Proxy,
    pub refresher: std::sync::Arc<refresh::Refresher>,
}
