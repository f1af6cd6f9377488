//! The metrics table every process of a server maps (a `memfd` made by the
//! supervisor): one row per worker.

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::metrics::Table;

#[pyclass(frozen, module = "signaling_sharded._native")]
pub struct MetricsTable {
    pub(super) table: Arc<Table>,
}

#[pymethods]
impl MetricsTable {
    /// Maps the table of `workers` rows in the file open as `fd`, which
    /// stays the caller's to close.
    #[new]
    fn new(fd: i32, workers: usize) -> PyResult<Self> {
        // SAFETY: the caller keeps `fd` open for the call; ManuallyDrop
        // leaves it open afterwards.
        let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
        let table = Table::map(&file, workers)?;
        Ok(Self {
            table: Arc::new(table),
        })
    }

    /// Bytes a table of `workers` rows needs.
    #[staticmethod]
    fn size(workers: usize) -> usize {
        Table::size(workers)
    }

    /// Marks worker `worker` running or gone (its gauges drop to zero).
    fn set_up(&self, worker: usize, up: bool) -> PyResult<()> {
        self.check(worker)?;
        self.table.set_up(worker, up);
        Ok(())
    }

    fn count_restart(&self, worker: usize) -> PyResult<()> {
        self.check(worker)?;
        self.table.count_restart(worker);
        Ok(())
    }

    fn render(&self) -> String {
        self.table.render()
    }
}

impl MetricsTable {
    fn check(&self, worker: usize) -> PyResult<()> {
        if worker < self.table.workers() {
            Ok(())
        } else {
            Err(PyValueError::new_err("no such worker"))
        }
    }
}
