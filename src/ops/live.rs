//! What the HTTP endpoint reads of the running pipeline, which a SIGHUP
//! may replace ([`crate::ops::reload`]): the settings in force (mappings,
//! mode) and the running sink's handle — absent while the pipeline
//! restarts, so that the old sink can drain (it ends once every handle to
//! it is gone).

use std::sync::{Arc, RwLock};

use crate::config::Settings;
use crate::sink::SinkHandle;

/// The settings in force and the running sink.
pub struct Live {
    settings: RwLock<Arc<Settings>>,
    sink: RwLock<Option<SinkHandle>>,
}

impl Live {
    /// What runs now.
    pub fn new(settings: Arc<Settings>, sink: Option<SinkHandle>) -> Arc<Live> {
        Arc::new(Live {
            settings: RwLock::new(settings),
            sink: RwLock::new(sink),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("lock").clone()
    }

    /// The running sink; `None` while the pipeline restarts.
    pub fn sink(&self) -> Option<SinkHandle> {
        self.sink.read().expect("lock").clone()
    }

    /// Drops the handle to the running sink (the pipeline restarts).
    pub fn pause(&self) {
        *self.sink.write().expect("lock") = None;
    }

    /// A new pipeline runs.
    pub fn set(&self, settings: Arc<Settings>, sink: SinkHandle) {
        *self.settings.write().expect("lock") = settings;
        *self.sink.write().expect("lock") = Some(sink);
    }
}
