//! `wasi:config/store`: the handler's `[handler.allow] config` values,
//! served by wasmtime-wasi-config. Read-only, so granting it needs no check.

use wasmtime_wasi_config::WasiConfig;

use super::HostState;

pub(crate) fn view(state: &mut HostState) -> WasiConfig<'_> {
    WasiConfig::new(&state.caps.config)
}
