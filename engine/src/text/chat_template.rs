//! Chat templates: the Jinja template a model ships in `tokenizer_config.json`, rendered the way
//! transformers' `apply_chat_template` renders it, so that a conversation becomes exactly the
//! prompt text the model was trained on.
//!
//! [`super::TextTokenizer`] compiles the template once at load and renders it for every chat
//! request (the frontend and the in-process generator call it through
//! [`super::TextTokenizer::apply_chat_template`]). Transformers uses a Jinja2 environment with
//! `trim_blocks`, `lstrip_blocks` and loop controls, where templates may call Python string
//! methods (DeepSeek-R1's does `content.split('</think>')[-1]`) and `raise_exception(msg)`; we
//! mirror that with minijinja and minijinja-contrib's pycompat layer.

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind, context};

use crate::error::{EngineError, Result};

/// One turn of a conversation, as an OpenAI-style chat request carries it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// The roles chat templates are written for; anything else is rejected before rendering,
    /// because templates silently drop roles they do not know and the model would then answer a
    /// conversation the caller never sent.
    pub const ROLES: [&'static str; 4] = ["system", "user", "assistant", "tool"];

    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The name the template is registered under; minijinja puts it in error locations.
const TEMPLATE_NAME: &str = "chat_template";

/// What `raise_exception` attaches to its error, so that `render` can tell a template rejecting
/// the conversation (the caller's fault) from a template failing to render (the model's fault).
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// A compiled chat template and the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source` once; a syntax error names the problem and its line.
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        // Jinja2's defaults as transformers configures them; without trim/lstrip, templates
        // written with one block per line would leave newlines and indentation in the prompt.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::ChatTemplate(format!("cannot configure the syntax: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(
                    minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone())
                        .with_source(RaisedException(msg)),
                )
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source).map_err(|e| {
            EngineError::ChatTemplate(format!("the template does not compile: {e}"))
        })?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders a conversation. Roles are validated first, so an unknown role is reported as the
    /// caller's error with the message index rather than surfacing as odd template output.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(EngineError::InvalidInput(
                "chat.messages: empty; a chat needs at least one message".into(),
            ));
        }
        for (i, m) in messages.iter().enumerate() {
            if !ChatMessage::ROLES.contains(&m.role.as_str()) {
                return Err(EngineError::InvalidInput(format!(
                    "chat.messages[{i}].role: unknown role {:?}; expected one of {}",
                    m.role,
                    ChatMessage::ROLES.join(", ")
                )));
            }
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::ChatTemplate(format!("the template is missing: {e}")))?;
        // Plain maps, not serialized structs: templates test keys (`'tool_calls' in message`),
        // so a message must hold exactly the keys a JSON chat message would.
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_deref().unwrap_or(""),
                eos_token => self.eos_token.as_deref().unwrap_or(""),
            })
            .map_err(|e| match raised_exception(&e) {
                Some(msg) => EngineError::InvalidInput(format!(
                    "chat.messages: the model's chat template rejects this conversation: {msg}"
                )),
                None => EngineError::ChatTemplate(format!("rendering failed: {e}")),
            })
    }
}

/// The message of a `raise_exception` call somewhere in `err`'s source chain.
fn raised_exception(err: &minijinja::Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = cur {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return Some(raised.0.clone());
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(src: &str) -> ChatTemplate {
        ChatTemplate::new(src.into(), Some("<s>".into()), Some("</s>".into())).expect("compiles")
    }

    #[test]
    fn python_string_methods_negative_indexing_and_variables() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}{{ m['content'].split('</think>')[-1] | trim }}|{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}",
        );
        let msgs = [
            ChatMessage::new("assistant", "<think>x</think> answer"),
            ChatMessage::new("user", "plain"),
        ];
        assert_eq!(
            t.render(&msgs, true).expect("render"),
            "<s>answer|plain|</s>"
        );
        assert_eq!(t.render(&msgs, false).expect("render"), "<s>answer|plain|");
    }

    #[test]
    fn namespace_none_membership_and_loop_controls() {
        let t = template(
            "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'tool' %}{% break %}{% endif %}{% if 'tool_calls' in m %}T{% endif %}{% if m.tool_calls is none %}N{% endif %}{% if m.content is none %}C{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
        );
        let msgs = [
            ChatMessage::new("user", "a"),
            ChatMessage::new("assistant", "b"),
            ChatMessage::new("tool", "c"),
            ChatMessage::new("user", "d"),
        ];
        // `tool_calls` is absent (undefined, not none) and content is never none.
        assert_eq!(t.render(&msgs, false).expect("render"), "2");
    }

    #[test]
    fn blocks_trim_their_newline_and_leading_indentation_as_in_transformers() {
        let t = template(
            "{% for m in messages %}\n    {% if true %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n",
        );
        let msgs = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        assert_eq!(t.render(&msgs, false).expect("render"), "[a]\n[b]\n");
    }

    #[test]
    fn raise_exception_rejects_the_conversation_with_its_message() {
        let t = template(
            "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}",
        );
        assert_eq!(
            t.render(&[ChatMessage::new("user", "hi")], false)
                .expect("render"),
            "hi"
        );
        let err = t
            .render(&[ChatMessage::new("system", "x")], false)
            .expect_err("raises");
        assert!(matches!(err, EngineError::InvalidInput(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("chat.messages") && msg.contains("System role not supported"),
            "{msg}"
        );
    }

    #[test]
    fn other_render_failures_are_chat_template_errors() {
        let t = template("{{ messages[0].content + 1 }}");
        let err = t
            .render(&[ChatMessage::new("user", "x")], false)
            .expect_err("type error");
        assert!(matches!(err, EngineError::ChatTemplate(_)), "{err:?}");
    }

    #[test]
    fn unknown_role_names_the_message_index_and_role() {
        let t = template("{{ messages[0].content }}");
        let msgs = [
            ChatMessage::new("user", "hi"),
            ChatMessage::new("wizard", "x"),
        ];
        let err = t.render(&msgs, true).expect_err("bad role");
        assert!(matches!(err, EngineError::InvalidInput(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "invalid input: chat.messages[1].role: unknown role \"wizard\"; expected one of system, user, assistant, tool"
        );
    }

    #[test]
    fn an_empty_conversation_is_invalid_input() {
        let err = template("x").render(&[], true).expect_err("empty");
        assert!(matches!(err, EngineError::InvalidInput(_)), "{err:?}");
        assert!(err.to_string().contains("chat.messages"), "{err}");
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time_with_the_line() {
        let err = ChatTemplate::new("ok\n{% if %}".into(), None, None).expect_err("bad syntax");
        assert!(matches!(err, EngineError::ChatTemplate(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("does not compile") && msg.contains("chat_template:2"),
            "{msg}"
        );
    }

    #[test]
    fn missing_special_tokens_render_as_empty() {
        let t = ChatTemplate::new("[{{ bos_token }}]".into(), None, None).expect("compiles");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], false)
                .expect("render"),
            "[]"
        );
    }
}
