//! What the HTTP endpoint reads of the running pipeline, which a SIGHUP
//! may replace ([`crate::ops::reload`]): the settings in force (mappings,
//! mode), the running sink's handle and the running replication source's
//! `resync` channel — both absent while the pipeline restarts, so that the
//! old sink can drain (it ends once every handle to it is gone) and a
//! `resync` never reaches a source that is stopping.

use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;

use crate::config::Settings;
use crate::sink::SinkHandle;
use crate::source::replication::ResyncRequest;

/// The handles of the running pipeline.
#[derive(Clone)]
pub struct Running {
    /// The running sink (for replay).
    pub sink: SinkHandle,
    /// Re-copy requests to the running replication source (`None` in poll
    /// mode).
    pub resync: Option<mpsc::Sender<ResyncRequest>>,
}

/// The settings in force and the running pipeline.
pub struct Live {
    settings: RwLock<Arc<Settings>>,
    running: RwLock<Option<Running>>,
}

impl Live {
    /// What runs now (`None` while no pipeline runs).
    pub fn new(settings: Arc<Settings>, running: Option<Running>) -> Arc<Live> {
        Arc::new(Live {
            settings: RwLock::new(settings),
            running: RwLock::new(running),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("lock").clone()
    }

    /// The running pipeline's handles; `None` while it restarts.
    pub fn running(&self) -> Option<Running> {
        self.running.read().expect("lock").clone()
    }

    /// The running sink; `None` while the pipeline restarts.
    pub fn sink(&self) -> Option<SinkHandle> {
        self.running().map(|r| r.sink)
    }

    /// Drops the handles to the running pipeline (it restarts or stops).
    pub fn pause(&self) {
        *self.running.write().expect("lock") = None;
    }

    /// A new pipeline runs.
    pub fn set(&self, settings: Arc<Settings>, running: Running) {
        *self.settings.write().expect("lock") = settings;
        *self.running.write().expect("lock") = Some(running);
    }
}
