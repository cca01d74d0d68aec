//! The protobuf codec of every service, with small initial buffers.
//!
//! tonic's default codec gives each call an 8 KiB encode buffer that lives as
//! long as the call; for a server holding tens of thousands of mostly idle
//! WatchToken streams that buffer is most of a watcher's memory. Messages of
//! this API are small, and the buffers grow on demand for large payloads.

use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial buffer size, in bytes.
const BUFFER: usize = 128;
/// How much encoded data a stream buffers before yielding it to the transport.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `ProstCodec` with 128-byte initial buffers, which grow on demand.
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SmallEncoder<T>;
    type Decoder = SmallDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SmallEncoder(ProstCodec::<T, U>::raw_encoder(settings()))
    }

    fn decoder(&mut self) -> Self::Decoder {
        SmallDecoder(ProstCodec::<T, U>::raw_decoder(settings()))
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER, YIELD_THRESHOLD)
}

/// The encoder of [`SmallBufferCodec`].
#[derive(Debug)]
pub struct SmallEncoder<T>(ProstEncoder<T>);

impl<T: prost::Message> Encoder for SmallEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        self.0.encode(item, dst)
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

/// The decoder of [`SmallBufferCodec`].
#[derive(Debug)]
pub struct SmallDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for SmallDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(src)
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}
