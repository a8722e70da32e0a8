//! The one wasmtime [`Engine`] of a runtime, configured in [`build_engine`],
//! and the epoch ticker that turns handler timeouts into traps.
//!
//! Choices (measured, see the notes on wasmtime): the pooling allocator with
//! keep-resident tuning makes a fresh instance per event cost a few µs;
//! epoch interruption (not fuel) bounds CPU time at ~15% overhead.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::WasmError;
use super::needs::Needs;

/// Epoch granularity: a timeout is detected at most this late.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Sizing of the instance pool.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Largest linear memory any handler may grow to (the largest `memory`).
    pub max_memory: u64,
    /// Component instances alive at once: at least the runtime's
    /// concurrency (one instance per in-flight event).
    pub instances: u32,
    /// The largest needs of the components to run (each field the maximum
    /// over them); the pool gives every instance room for this much.
    pub per_instance: Needs,
}

/// Room per component instance that the pool gives at least, whatever the
/// loaded components need: a Rust component is ~4 core instances (the
/// program plus wit-component shims), one memory and a couple of tables, so
/// a reload to a somewhat larger one still fits.
pub const MIN_ROOM: Needs = Needs {
    core_instances: 8,
    memories: 2,
    tables: 4,
    memories_per_module: 1,
    tables_per_module: 1,
    min_memory: 0,
    initial_memory_total: 0,
    // wasmtime's default.
    min_table_elements: 20_000,
};

impl EngineLimits {
    /// What the pool gives each instance: the components' needs, at least
    /// [`MIN_ROOM`].
    pub fn room(&self) -> Needs {
        self.per_instance.max(&MIN_ROOM)
    }
}

/// Build the engine every handler version is compiled for and runs on.
pub fn build_engine(limits: EngineLimits) -> Result<Engine, WasmError> {
    let n = limits.instances.max(1);
    let room = limits.room();
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(room.core_instances))
        .total_memories(n.saturating_mul(room.memories))
        .total_tables(n.saturating_mul(room.tables))
        .max_memories_per_module(room.memories_per_module)
        .max_tables_per_module(room.tables_per_module)
        .table_elements(usize::try_from(room.min_table_elements).unwrap_or(usize::MAX))
        .total_stacks(n)
        .max_memory_size(usize::try_from(limits.max_memory).unwrap_or(usize::MAX))
        // Keep the first pages of a slot mapped between instances: reusing
        // them instead of faulting fresh zero pages is what makes a fresh
        // instance per event cheap.
        .linear_memory_keep_resident(4 << 20)
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(512 << 10)
        .pagemap_scan(Enabled::Auto);

    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config).map_err(|e| WasmError::Engine(format!("{e:#}")))
}

/// Increments the engine epoch every [`EPOCH_TICK`] on a plain thread (it
/// must tick even when every tokio worker is busy running guests). Stops on
/// drop.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    pub fn start(engine: &Engine) -> Result<Self, WasmError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let engine = engine.clone();
        std::thread::Builder::new()
            .name("outrun-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| WasmError::Engine(format!("cannot start the epoch ticker thread: {e}")))?;
        Ok(Self { stop })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
