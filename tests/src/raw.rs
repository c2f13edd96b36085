//! gRPC calls with hand-made message bytes, for what a well-behaved client never sends:
//! malformed protobuf on any method, unary or streaming.

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// Sends each message's bytes as they are and hands back each answer's bytes.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Protobuf that no message decodes, with what is wrong with it: each is refused whatever the
/// message type (field 1 is a string or a message in every request type they are sent as).
pub const MALFORMED: [(&str, &[u8]); 4] = [
    ("invalid UTF-8 in a string field", &[0x0a, 0x02, 0xff, 0xfe]),
    ("a length past the end", &[0x0a, 0x10, b'a']),
    ("wire type 7", &[0x0f]),
    (
        "groups nested 200 deep",
        &[0x7b; 200], // field 15, start group, again and again
    ),
];

/// Calls `path` (`/package.Service/Method`) with `messages` as a client stream (one message for
/// a unary or server-streaming method) and reads every answer: the answers' bytes, or the
/// status the call ended with.
pub async fn call(
    channel: Channel,
    path: &'static str,
    messages: Vec<Vec<u8>>,
) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let request = tonic::Request::new(tokio_stream::iter(messages));
    let mut stream = grpc.streaming(request, path, RawCodec).await?.into_inner();
    let mut answers = Vec::new();
    while let Some(m) = stream.message().await? {
        answers.push(m);
    }
    Ok(answers)
}
