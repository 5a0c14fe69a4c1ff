//! A producer whose delivery reports wake the tokio runtime directly.
//!
//! librdkafka puts a producer's delivery reports (and errors) on its main queue. With
//! `rd_kafka_queue_io_event_enable`, it also writes a byte to a file descriptor of ours
//! whenever that queue goes from empty to non-empty, once until the queue is read again.
//! A runtime task awaits the other end of that socket pair and serves the queue to empty
//! (see `serve_reports` in the parent module), so reports are handled on a runtime worker
//! without a polling thread in between. The rdkafka crate has no safe binding for this;
//! these few calls are this crate's only `unsafe` besides `memory.rs`, and this file
//! keeps the one invariant they need: the queue reference is released before its client.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use rdkafka::bindings as rdsys;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};

/// A [`BaseProducer`] whose main queue wakes a socket (see the module doc).
pub struct ServedProducer<C: ProducerContext + 'static> {
    /// Declared first, so dropped first: a queue reference must not outlive its client.
    queue: MainQueue,
    producer: BaseProducer<C>,
}

impl<C: ProducerContext + 'static> ServedProducer<C> {
    /// Wires the producer's main queue to a socket pair; returns the end to await.
    pub fn new(producer: BaseProducer<C>) -> io::Result<(Self, UnixStream)> {
        let (writer, reader) = UnixStream::pair()?;
        // librdkafka ignores a failed write: a full socket already means "readable".
        writer.set_nonblocking(true)?;
        reader.set_nonblocking(true)?;
        // SAFETY: `native_ptr` is the live client owned by `producer`, which `Self` keeps
        // alive for longer than the queue reference taken here (field order).
        let queue = unsafe { rdsys::rd_kafka_queue_get_main(producer.client().native_ptr()) };
        if queue.is_null() {
            return Err(io::Error::other("librdkafka returned no main queue"));
        }
        // SAFETY: `queue` is a valid reference; librdkafka copies the payload, and the
        // descriptor stays open as long as the queue can write to it (`MainQueue` owns
        // it and turns the wake-ups off before closing it).
        unsafe {
            rdsys::rd_kafka_queue_io_event_enable(
                queue,
                writer.as_raw_fd(),
                b"w".as_ptr().cast(),
                1,
            );
        }
        let queue = MainQueue {
            queue,
            _writer: writer,
        };
        Ok((Self { queue, producer }, reader))
    }

    /// Events (delivery reports, errors) waiting to be served.
    pub fn pending_events(&self) -> usize {
        // SAFETY: a valid queue reference (see `new`).
        unsafe { rdsys::rd_kafka_queue_length(self.queue.queue) }
    }
}

impl<C: ProducerContext + 'static> std::ops::Deref for ServedProducer<C> {
    type Target = BaseProducer<C>;

    fn deref(&self) -> &BaseProducer<C> {
        &self.producer
    }
}

struct MainQueue {
    queue: *mut rdsys::rd_kafka_queue_t,
    /// The end librdkafka writes to.
    _writer: UnixStream,
}

// SAFETY: librdkafka's queue operations lock the queue; the handle may be used from any
// thread.
unsafe impl Send for MainQueue {}
// SAFETY: as above.
unsafe impl Sync for MainQueue {}

impl Drop for MainQueue {
    fn drop(&mut self) {
        // SAFETY: a valid queue reference, released exactly once, after the wake-ups that
        // use `_writer` are turned off (it is closed after this body).
        unsafe {
            rdsys::rd_kafka_queue_io_event_enable(self.queue, -1, std::ptr::null(), 0);
            rdsys::rd_kafka_queue_destroy(self.queue);
        }
    }
}
