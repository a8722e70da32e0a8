//! What a component needs from the instance pool, read from its binary with
//! wasmparser before anything is compiled: its core instances, linear
//! memories and tables, and the initial sizes of the largest memory and
//! table. A Python component (componentize-py) is ~15 core instances with a
//! 12 MiB initial memory; a Rust one ~4 with 1-2 MiB. Knowing this up front
//! lets a `memory` cap that is too small be refused at load instead of after
//! a compile of tens of seconds, and lets the pool be sized for the
//! components actually loaded.

use serde::Serialize;
use wasmparser::{Parser, Payload};

use super::spec::ByteSize;

/// See the module docs. Counts are per instance of the component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Needs {
    /// Core module instances (the program plus wit-component shims).
    pub core_instances: u32,
    /// Linear memories defined by its core modules.
    pub memories: u32,
    /// Tables defined by its core modules.
    pub tables: u32,
    /// Most memories / tables one core module defines.
    pub memories_per_module: u32,
    pub tables_per_module: u32,
    /// Initial size of its largest linear memory, in bytes: the smallest
    /// `memory` cap it can start under (the cap applies per memory).
    pub min_memory: u64,
    /// Initial sizes of all its memories together, in bytes.
    pub initial_memory_total: u64,
    /// Initial elements of its largest table.
    pub min_table_elements: u64,
}

impl Needs {
    /// Read the needs of the component in `bytes`. Errors are wasmparser's
    /// (a truncated or malformed binary).
    pub fn of(bytes: &[u8]) -> Result<Self, String> {
        let mut n = Needs::default();
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.map_err(|e| e.to_string())? {
                Payload::InstanceSection(reader) => {
                    for instance in reader {
                        if let wasmparser::Instance::Instantiate { .. } =
                            instance.map_err(|e| e.to_string())?
                        {
                            n.core_instances += 1;
                        }
                    }
                }
                Payload::MemorySection(reader) => {
                    n.memories_per_module = n.memories_per_module.max(reader.count());
                    for memory in reader {
                        let m = memory.map_err(|e| e.to_string())?;
                        let bytes = m.initial.saturating_mul(1u64 << m.page_size_log2());
                        n.memories += 1;
                        n.min_memory = n.min_memory.max(bytes);
                        n.initial_memory_total = n.initial_memory_total.saturating_add(bytes);
                    }
                }
                Payload::TableSection(reader) => {
                    n.tables_per_module = n.tables_per_module.max(reader.count());
                    for table in reader {
                        let t = table.map_err(|e| e.to_string())?;
                        n.tables += 1;
                        n.min_table_elements = n.min_table_elements.max(t.ty.initial);
                    }
                }
                _ => {}
            }
        }
        Ok(n)
    }

    /// Each field the larger of the two: room for either.
    pub fn max(self, other: &Needs) -> Needs {
        Needs {
            core_instances: self.core_instances.max(other.core_instances),
            memories: self.memories.max(other.memories),
            tables: self.tables.max(other.tables),
            memories_per_module: self.memories_per_module.max(other.memories_per_module),
            tables_per_module: self.tables_per_module.max(other.tables_per_module),
            min_memory: self.min_memory.max(other.min_memory),
            initial_memory_total: self.initial_memory_total.max(other.initial_memory_total),
            min_table_elements: self.min_table_elements.max(other.min_table_elements),
        }
    }

    /// The one-line summary `handlers check` prints.
    pub fn describe(&self) -> String {
        format!(
            "needs {} core instances, {} memories (largest starts at {}, {} in all), {} tables (largest starts at {} elements)",
            self.core_instances,
            self.memories,
            ByteSize(self.min_memory),
            ByteSize(self.initial_memory_total),
            self.tables,
            self.min_table_elements
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Needs;

    #[test]
    fn a_truncated_binary_is_an_error() {
        assert!(Needs::of(b"\0asm\x0d\0\x01\0\x01\x7f").is_err());
        assert_eq!(Needs::of(b"\0asm\x0d\0\x01\0").unwrap(), Needs::default());
    }
}
