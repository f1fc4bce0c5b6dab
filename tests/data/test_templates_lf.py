"""LLaMA-Factory's chat templates (template_registry.py) against the families' own jinja and LLaMA-Factory's text.

(a) Where the model family publishes a jinja chat template, the ids our template gives a whole conversation
(single and multi turn, with and without a system prompt) equal ``apply_chat_template``'s ids with that jinja,
and so do the generation prompts. The tokenizer is the tiny test tokenizer with the family's special tokens
added as single ids and its bos / eos set (nothing downloads); the jinja texts are copied below with where they
are published. Where LLaMA-Factory's format differs from the family's jinja we follow LLaMA-Factory (our users
come from it) and the test asserts the difference itself, documented in ``FAMILIES``.
(b) Every ported template renders exactly the text LLaMA-Factory's template.py defines, written out by hand.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from jinja2 import TemplateError
from test_templates import CONVS, conv

from tunesmith.data import TEMPLATES, Conversation, Turn, get_template
from tunesmith.data.template_registry import LF_TEMPLATES
from tunesmith.data.templates import INTERNLM2_SYSTEM, QWEN_SYSTEM
from tunesmith.errors import DataError

# --- the families' published chat templates --------------------------------------------------------------------
# Each is the "chat_template" of the named model's tokenizer_config.json (or chat_template.json) on the Hugging
# Face Hub, copied from the public copy named after it.

# meta-llama/Llama-2-7b-chat-hf; copy: ollama/ollama template/index.json (llama2-chat)
LLAMA2 = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
# meta-llama/Meta-Llama-3-8B-Instruct; copy: ollama/ollama template/index.json (llama3-instruct)
LLAMA3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
# meta-llama/Llama-4-Scout-17B-16E-Instruct; copy: huggingface/transformers
# src/transformers/models/llama4/processing_llama4.py (chat_template)
LLAMA4 = "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- else %}\n        {%- set date_string = \"26 Jul 2024\" %}\n    {%- endif %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0]['role'] == 'system' %}    \n    {%- if messages[0]['content'] is string %}\n        {%- set system_message = messages[0]['content']|trim %}\n    {%- else %}\n        {#- FIXME: The processor requires an array, always. #}\n        {%- set system_message = messages[0]['content'][0]['text']|trim %}\n    {%- endif %}\n    {%- set messages = messages[1:] %}\n    {%- set user_supplied_system_message = true %}\n{%- else %}\n    {%- set system_message = \"\" %}\n    {%- set user_supplied_system_message = false %}\n{%- endif %}\n\n{#- System message if the user supplied one #}\n{%- if user_supplied_system_message %}\n    {{- \"<|header_start|>system<|header_end|>\n\n\" }}\n    {%- if tools is not none %}\n        {{- \"Environment: ipython\n\" }}\n    {%- endif %}\n    {%- if tools is not none and not tools_in_user_message %}\n        {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n        {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n        {{- \"Do not use variables.\n\n\" }}\n        {%- for t in tools %}\n            {{- t | tojson(indent=4) }}\n            {{- \"\n\n\" }}\n        {%- endfor %}\n    {%- endif %}\n    {{- system_message }}\n    {{- \"<|eot|>\" }}\n{%- endif %}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n{%- endif %}\n    {{- '<|header_start|>user<|header_end|>\n\n' -}}\n    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n    {{- \"with its proper arguments that best answers the given prompt.\n\n\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\n\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\n\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot|>\"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n    {{- '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}\n        {%- if message['content'] is string %}\n            {{- message['content'] }}\n        {%- else %}\n            {%- for content in message['content'] %}\n                {%- if content['type'] == 'image' %}\n                    {{- '<|image|>' }}\n                {%- elif content['type'] == 'text' %}\n                    {{- content['text'] }}\n                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n        {{- \"<|eot|>\" }}\n    {%- elif 'tool_calls' in message and message.tool_calls|length > 0 %}\n       {{- '<|header_start|>assistant<|header_end|>\n\n' -}}\n       {{- '<|python_start|>' }}\n        {%- if message['content'] is string %}\n            {{- message['content'] }}\n        {%- else %}\n            {%- for content in message['content'] %}\n                {%- if content['type'] == 'image' %}\n                    {{- '<|image|>' }}\n                {%- elif content['type'] == 'text' %}\n                    {{- content['text'] }}\n                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n       {{- '<|python_end|>' }}\n        {%- for tool_call in message.tool_calls %}\n           {{- '{\"name\": \"' + tool_call.function.name + '\", ' }}\n           {{- '\"parameters\": ' }}\n           {{- tool_call.function.arguments | tojson }}\n           {{- \"}\" }}\n        {%- endfor %}\n       {{- \"<|eot|>\" }}\n    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n        {{- \"<|header_start|>ipython<|header_end|>\n\n\" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- \"<|eot|>\" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|header_start|>assistant<|header_end|>\n\n' }}\n{%- endif %}\n"
# mistralai/Mistral-7B-Instruct-v0.3 (mistralai's "v3" template, also Mistral-Large-Instruct-2407's); copy:
# ggml-org/llama.cpp tests/test-chat-template.cpp
MISTRAL_V3 = '{%- if messages[0]["role"] == "system" %}\n    {%- set system_message = messages[0]["content"] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n\n{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n{%- set ns = namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}\n        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}\n        {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n    {%- endif %}\n{%- endfor %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message["role"] == "user" %}\n        {%- if tools is not none and (message == user_messages[-1]) %}\n            {{- "[AVAILABLE_TOOLS] [" }}\n            {%- for tool in tools %}\n                {%- set tool = tool.function %}\n                {{- \'{"type": "function", "function": {\' }}\n                {%- for key, val in tool.items() if key != "return" %}\n                    {%- if val is string %}\n                        {{- \'"\' + key + \'": "\' + val + \'"\' }}\n                    {%- else %}\n                        {{- \'"\' + key + \'": \' + val|tojson }}\n                    {%- endif %}\n                    {%- if not loop.last %}\n                        {{- ", " }}\n                    {%- endif %}\n                {%- endfor %}\n                {{- "}}" }}\n                {%- if not loop.last %}\n                    {{- ", " }}\n                {%- else %}\n                    {{- "]" }}\n                {%- endif %}\n            {%- endfor %}\n            {{- "[/AVAILABLE_TOOLS]" }}\n            {%- endif %}\n        {%- if loop.last and system_message is defined %}\n            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n        {%- else %}\n            {{- "[INST] " + message["content"] + "[/INST]" }}\n        {%- endif %}\n    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n        {{- "[TOOL_CALLS] [" }}\n        {%- for tool_call in message.tool_calls %}\n            {%- set out = tool_call.function|tojson %}\n            {{- out[:-1] }}\n            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n            {%- endif %}\n            {{- \', "id": "\' + tool_call.id + \'"}\' }}\n            {%- if not loop.last %}\n                {{- ", " }}\n            {%- else %}\n                {{- "]" + eos_token }}\n            {%- endif %}\n        {%- endfor %}\n    {%- elif message["role"] == "assistant" %}\n        {{- " " + message["content"]|trim + eos_token}}\n    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n        {%- if message.content is defined and message.content.content is defined %}\n            {%- set content = message.content.content %}\n        {%- else %}\n            {%- set content = message.content %}\n        {%- endif %}\n        {{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}\n        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n        {%- endif %}\n        {{- \'"call_id": "\' + message.tool_call_id + \'"}[/TOOL_RESULTS]\' }}\n    {%- else %}\n        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}\n    {%- endif %}\n{%- endfor %}\n'
# google/gemma-7b-it; copy: ollama/ollama template/index.json (gemma-instruct), EricLBuehler/mistral.rs
GEMMA = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
# google/gemma-3-*-it; copy: ShishirPatil/gorilla berkeley-function-call-leaderboard/.../local_inference/gemma.py
GEMMA3 = "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
# THUDM/glm-4-9b-chat; copy: ShishirPatil/gorilla berkeley-function-call-leaderboard/.../local_inference/glm.py
GLM4 = "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。{% elif tool['type'] == 'python' %}\n\n## python\n\n当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。{% elif tool['type'] == 'simple_browser' %}\n\n## simple_browser\n\n你可以使用 `simple_browser` 工具。该工具支持以下函数：\n`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` 参数控制搜索内容的时效性。\n`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n`open_url(url: str)`：打开指定的 URL。\n\n使用 `【{引用 id}†{引用文本}】` 来引用内容。\n\n操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; 3. 根据获得的内容进行回复。在回复中应当引用信息来源。\n 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。{% elif tool['type'] == 'cogview' %}\n\n## cogview\n\n如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。你需要向 `cogview` 发送图像描述，规则：\n- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。{% endif %}{% endfor %}{% endif %}{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
# THUDM/chatglm3-6b (tokenizer_config.json line 42); copy: ggml-org/llama.cpp tests/test-chat-template.cpp
CHATGLM3 = "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
# deepseek-ai/DeepSeek-V3-0324; copy: the tokenizer.chat_template of its GGUF conversion (unsloth)
DEEPSEEK_V3 = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true, is_last_user=false) %}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{%- set ns.is_first = false -%}{%- set ns.is_last_user = true -%}{{'<｜User｜>' + message['content'] + '<｜Assistant｜>'}}{%- endif %}{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] is not none %}{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{%- endif %}{%- set ns.is_first = false %}{%- set ns.is_tool = false -%}{%- set ns.is_output_first = true %}{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}{{message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or message['tool_calls'] is none)%}{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{{content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_last_user and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
# deepseek-ai/DeepSeek-R1; copy: ShishirPatil/gorilla
# berkeley-function-call-leaderboard/bfcl_eval/model_handler/local_inference/deepseek_reasoning.py
DEEPSEEK_R1 = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
# microsoft/Phi-3.5-mini-instruct (also Phi-3-mini / Phi-3-medium); copy: ShishirPatil/gorilla
# berkeley-function-call-leaderboard/bfcl/model_handler/local_inference/phi.py before commit c6e1af35
PHI3 = "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
# microsoft/phi-4; copy: ShishirPatil/gorilla berkeley-function-call-leaderboard/.../local_inference/phi.py
PHI4 = "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
# 01-ai/Yi-1.5-*-Chat (the system text written raw); copy: ollama/ollama template/index.json (first chatml entry)
YI_1_5 = "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% endif %}{% if system_message is defined %}{{ system_message }}{% endif %}{% for message in messages %}{% set content = message['content'] %}{% if message['role'] == 'user' %}{{ '<|im_start|>user\\n' + content + '<|im_end|>\\n<|im_start|>assistant\\n' }}{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
# internlm/internlm2-chat-* and internlm3-8b-instruct (ChatML after bos); copy: ollama/ollama template/index.json
INTERNLM = "{{bos_token}}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
# Baichuan2 publishes no jinja (its chat() builds ids in Python); vLLM's community template:
# vllm-project/vllm examples/template_baichuan.jinja
BAICHUAN = "{{ (messages|selectattr('role', 'equalto', 'system')|list|last).content|trim if (messages|selectattr('role', 'equalto', 'system')|list) else '' }}\n\n{%- for message in messages -%}\n    {%- if message['role'] == 'user' -%}\n        {{- '<reserved_106>' + message['content'] -}}\n    {%- elif message['role'] == 'assistant' -%}\n        {{- '<reserved_107>' + message['content'] -}}\n    {%- endif -%}\n{%- endfor -%}\n\n{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}\n    {{- '<reserved_107>' -}}\n{% endif %}"

THINK_BLOCK = "<think>\n\n</think>\n\n"


# --- what LLaMA-Factory's format does differently --------------------------------------------------------------
def _without(suffix: str) -> Callable[[str, Conversation], str]:
    """The family's jinja ends a conversation after the last reply; LLaMA-Factory's efficient_eos adds eos."""
    return lambda text, _conv: text.removesuffix(suffix)


def _llama2_spaces(text: str, _conv: Conversation) -> str:
    """Llama-2's jinja writes ' ' + reply.strip() + ' ' + eos; LLaMA-Factory writes reply + eos."""
    return re.sub(r"\[/INST\](.*?)</s>", r"[/INST] \1 </s>", text, flags=re.S)


def _mistral_drops_system(text: str, conv: Conversation) -> str:
    """Mistral's v3 jinja writes the system message only into a LAST user turn, so a conversation ending with a
    reply loses it; LLaMA-Factory puts it at the start of the first user turn."""
    return text.replace(f"[INST] {conv.system}\n\n", "[INST] ", 1) if conv.system else text


def _mistral_system_last(text: str, conv: Conversation) -> str:
    """For a generation prompt the v3 jinja puts the system message into the last user turn."""
    if not conv.system:
        return text
    text = _mistral_drops_system(text, conv)
    at = text.rfind("[INST] ") + len("[INST] ")
    return text[:at] + conv.system + "\n\n" + text[at:]


def _chatglm3_spaces(text: str, _conv: Conversation) -> str:
    """ChatGLM3's jinja writes a space after each role line: its SentencePiece encodes a message with a word
    boundary in front, which LLaMA-Factory's per-slot encoding adds and its text does not show."""
    return text.replace("|>\n", "|>\n ")


def _r1_no_empty_think(text: str, _conv: Conversation) -> str:
    """R1's jinja removes every reply's <think> block; LLaMA-Factory (and we) put an empty one before the last
    reply that has none (we keep it untrained, in the prompt, as LLaMA-Factory's enable_thinking: false does)."""
    return text.replace("<｜Assistant｜>" + THINK_BLOCK, "<｜Assistant｜>")


def _r1_forced_thinking(text: str, _conv: Conversation) -> str:
    """R1's generation prompt opens a <think> block; ours closes an empty one (non-thinking generation)."""
    return text.removesuffix(THINK_BLOCK) + "<think>\n"


def _yi_raw_system(text: str, conv: Conversation) -> str:
    """Yi-1.5's jinja writes the system text raw; LLaMA-Factory's yi wraps it in ChatML."""
    return (
        text.replace(f"<|im_start|>system\n{conv.system}<|im_end|>\n", conv.system) if conv.system else text
    )


def _intern_no_default(text: str, conv: Conversation) -> str:
    """InternLM's jinja has no default system prompt; LLaMA-Factory's intern2 inserts one."""
    return text if conv.system else text.replace(f"<|im_start|>system\n{INTERNLM2_SYSTEM}<|im_end|>\n", "", 1)


def _both(*fns: Callable[[str, Conversation], str]) -> Callable[[str, Conversation], str]:
    def apply(text: str, conv: Conversation) -> str:
        for fn in fns:
            text = fn(text, conv)
        return text

    return apply


@dataclass(frozen=True)
class Family:
    jinja: str
    bos: str | None
    eos: str
    specials: tuple[str, ...] = ()
    trims: tuple[str, ...] = ()  # roles whose text the family's jinja trims (LLaMA-Factory keeps it as it is)
    train: Callable[[str, Conversation], str] | None = None  # our full render -> the family's
    gen: Callable[[str, Conversation], str] | None = None  # our generation prompt -> the family's
    refuses_system: bool = False


GLM_TOKENS = ("[gMASK]", "<sop>", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
DEEPSEEK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ("<｜User｜>", "<｜Assistant｜>"))
INTERN_FAMILY = Family(INTERNLM, "<s>", "</s>", ("<|im_start|>", "<|im_end|>"), train=_intern_no_default,
                       gen=_intern_no_default)
FAMILIES: dict[str, Family] = {
    # Llama-2's jinja strips each turn's text (the system block and the first user text as one piece)
    "llama2": Family(
        LLAMA2, "<s>", "</s>", trims=("user", "assistant"), train=_llama2_spaces, gen=_llama2_spaces
    ),
    # our llama3 trims every message like Meta's jinja (LLaMA-Factory's llama3 does not trim)
    "llama3": Family(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>")),
    "llama4": Family(
        LLAMA4, "<|begin_of_text|>", "<|eot|>", ("<|header_start|>", "<|header_end|>"), ("system",)
    ),
    "mistral": Family(
        MISTRAL_V3, "<s>", "</s>", trims=("assistant",), train=_mistral_drops_system, gen=_mistral_system_last
    ),
    # gemma-7b-it's jinja refuses a system message; LLaMA-Factory's gemma opens the first user turn with it
    "gemma": Family(
        GEMMA,
        "<bos>",
        "<eos>",
        ("<start_of_turn>", "<end_of_turn>"),
        ("user", "assistant"),
        refuses_system=True,
    ),
    "gemma3": Family(GEMMA3, "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), ("user", "assistant")),
    "glm4": Family(GLM4, None, "<|endoftext|>", GLM_TOKENS, train=_without("<|endoftext|>")),
    "chatglm3": Family(
        CHATGLM3,
        None,
        "</s>",
        GLM_TOKENS,
        train=_both(_without("</s>"), _chatglm3_spaces),
        gen=_chatglm3_spaces,
    ),
    "deepseek3": Family(DEEPSEEK_V3, *DEEPSEEK),
    "deepseekr1": Family(DEEPSEEK_R1, *DEEPSEEK, train=_r1_no_empty_think, gen=_r1_forced_thinking),
    # Phi-3's jinja ends a conversation (no generation prompt) with eos; LLaMA-Factory's phi does not
    "phi": Family(
        PHI3,
        None,
        "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        train=lambda text, _conv: text + "<|endoftext|>",
    ),
    "phi4": Family(PHI4, None, "<|im_end|>", ("<|im_start|>", "<|im_sep|>")),
    "yi": Family(YI_1_5, None, "<|im_end|>", ("<|im_start|>",), train=_yi_raw_system, gen=_yi_raw_system),
    "intern2": INTERN_FAMILY,
    "internlm3": INTERN_FAMILY,  # an alias of intern2
    # community jinja (vLLM): it trims the system text; the conversation's end gets LLaMA-Factory's eos
    "baichuan2": Family(
        BAICHUAN, None, "</s>", ("<reserved_106>", "<reserved_107>"), ("system",), train=_without("</s>")
    ),
}




def stripped(c: Conversation, roles: tuple[str, ...]) -> Conversation:
    """The conversation with the given roles' text stripped: what a trimming jinja renders of it."""
    system = c.system.strip() if c.system is not None and "system" in roles else c.system
    turns = [Turn(t.role, t.content.strip() if t.role in roles else t.content) for t in c.turns]
    return Conversation(turns, system, c.source)


def joined(pairs: list[tuple[list[int], list[int]]]) -> list[int]:
    return [i for prompt, reply in pairs for i in prompt + reply]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def rendered(template, tokenizer, c: Conversation) -> str:
    return "".join(template.render(tokenizer, c).pieces())


def family_text(tokenizer, family: Family, messages: list[dict[str, str]], generation: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=family.jinja, tokenize=False, add_generation_prompt=generation
    )


def with_tokens(base, bos: str | None, eos: str, specials: tuple[str, ...]):
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"eos_token": eos, **({"bos_token": bos} if bos else {})})
    tok.add_tokens(list(specials), special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def family_tokenizers(tiny_tokenizer) -> dict:
    return {name: with_tokens(tiny_tokenizer, f.bos, f.eos, f.specials) for name, f in FAMILIES.items()}


ALL_TOKENS = tuple(
    sorted(
        {t for f in FAMILIES.values() for t in (*f.specials, f.eos, f.bos) if t and t not in ("<s>", "</s>")}
        | {"<|eom|>", "<|eom_id|>"}
    )
)


@pytest.fixture(scope="module")
def lf_tokenizer(tiny_tokenizer):
    """Every family's special tokens, bos <s> and eos </s>: LLaMA-Factory's slots render as these."""
    return with_tokens(tiny_tokenizer, "<s>", "</s>", ALL_TOKENS)


# --- (a) the families' jinja -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_training_ids_equal_the_family_jinja_up_to_the_documented_difference(family_tokenizers, name, case):
    family, tok, c = FAMILIES[name], family_tokenizers[name], CONVS[case]
    if family.refuses_system and c.system is not None:
        pytest.skip("the family's jinja refuses a system message (test_gemma_puts_the_system_prompt_...)")
    template = get_template(name, tok)
    ours = stripped(c, family.trims)  # the family trims these roles; LLaMA-Factory renders them as they are
    pairs = template.encode_turns(tok, ours)
    text = rendered(template, tok, ours)
    assert joined(pairs) == ids(tok, text)
    assert len(pairs) == len(c.turns) // 2
    theirs = family_text(tok, family, c.to_messages())
    assert theirs == (family.train(text, ours) if family.train else text)
    if family.train is None:  # the same text: the same ids
        assert joined(pairs) == ids(tok, theirs)


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generation_prompt_equals_the_family_jinja_up_to_the_documented_difference(
    family_tokenizers, name, case
):
    family, tok, c = FAMILIES[name], family_tokenizers[name], CONVS[case]
    if family.refuses_system and c.system is not None:
        pytest.skip("the family's jinja refuses a system message")
    template = get_template(name, tok)
    ours = stripped(c, family.trims)
    history = ours.to_messages()[:-1]
    prompt = template.prompt_text(tok, history)
    assert template.encode_prompt(tok, history) == ids(tok, prompt)
    theirs = family_text(tok, family, c.to_messages()[:-1], generation=True)
    assert theirs == (family.gen(prompt, ours) if family.gen else prompt)


@pytest.mark.parametrize("name", sorted(n for n, f in FAMILIES.items() if f.trims))
def test_llama_factory_keeps_the_whitespace_that_the_family_jinja_trims(family_tokenizers, name):
    family, tok = FAMILIES[name], family_tokenizers[name]
    template = get_template(name, tok)
    c = conv(("q", " yo "), (" hi ", "a"), system=None if family.refuses_system else " sys ")
    trimmed = stripped(c, family.trims)
    assert family_text(tok, family, c.to_messages()) == family_text(tok, family, trimmed.to_messages())
    assert rendered(template, tok, c) != rendered(template, tok, trimmed)


def test_gemma_puts_the_system_prompt_into_the_first_user_turn_where_gemmas_jinja_refuses_it(
    family_tokenizers,
):
    tok = family_tokenizers["gemma"]
    c = CONVS["multi_system"]
    with pytest.raises(TemplateError, match="System role not supported"):
        family_text(tok, FAMILIES["gemma"], c.to_messages())
    text = rendered(get_template("gemma", tok), tok, c)
    assert text.startswith(
        "<bos><start_of_turn>user\nSys\nwith lines.\n\na<end_of_turn>\n<start_of_turn>model\nb"
    )
    # gemma3's jinja does the same as LLaMA-Factory
    assert family_text(tok, FAMILIES["gemma3"], c.to_messages()) == text


def test_llama3_trims_like_metas_jinja_unlike_llama_factory(family_tokenizers):
    tok = family_tokenizers["llama3"]
    c = conv((" hi ", " yo "))
    text = rendered(get_template("llama3", tok), tok, c)
    assert text == family_text(tok, FAMILIES["llama3"], c.to_messages())
    assert "\n\nhi<|eot_id|>" in text  # LLaMA-Factory's llama3 would keep " hi "


def test_qwen3_nothink_is_chatml_without_a_default_system_prompt(qwen_tokenizer, shared_dir):
    """Qwen3-*-Instruct-2507 render ChatML; checked against Qwen2.5's published jinja (the same ChatML), whose
    default system prompt qwen3_nothink does not insert."""
    qwen25 = (shared_dir / "templates" / "qwen2_5_chat_template.jinja").read_text(encoding="utf-8")
    template = get_template("qwen3_nothink", qwen_tokenizer)
    for c in CONVS.values():
        pairs = template.encode_turns(qwen_tokenizer, c)
        theirs = qwen_tokenizer.apply_chat_template(c.to_messages(), chat_template=qwen25, tokenize=False)
        text = rendered(template, qwen_tokenizer, c)
        default = "" if c.system else f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
        assert theirs == default + text
        assert joined(pairs) == ids(qwen_tokenizer, text)
    prompt = template.prompt_text(qwen_tokenizer, [{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # no <think> block


# --- (b) LLaMA-Factory's text ----------------------------------------------------------------------------------
# One conversation (system "S"; " hi " -> "yo ", "q2" -> "a2") rendered with bos <s> and eos </s>, written out from
# LLaMA-Factory's template.py slots: {"bos_token"} -> <s>, {"eos_token"} -> </s>, Llama2Template puts the formatted
# system text before the first user message, efficient_eos appends </s> after the conversation.
CHATML_TEXT = (
    "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n hi <|im_end|>\n<|im_start|>assistant\nyo <|im_end|>\n"
    "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n"
)
GEMMA_TEXT = (
    "<s><start_of_turn>user\nS\n\n hi <end_of_turn>\n<start_of_turn>model\nyo <end_of_turn>\n"
    "<start_of_turn>user\nq2<end_of_turn>\n<start_of_turn>model\na2<end_of_turn>\n"
)
LF_TEXT = {
    "empty": "S hi yo q2a2",
    "alpaca": "S### Instruction:\n hi \n\n### Response:\nyo </s>\n\n### Instruction:\nq2\n\n### Response:\na2</s>\n\n",
    "vicuna": "SUSER:  hi  ASSISTANT:yo </s>USER: q2 ASSISTANT:a2</s>",
    "llama2": "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\n hi  [/INST]yo </s><s>[INST] q2 [/INST]a2</s>",
    "mistral": "<s>[INST] S\n\n hi [/INST] yo </s>[INST] q2[/INST] a2</s>",
    "llama4": (
        "<s><|header_start|>system<|header_end|>\n\nS<|eot|><|header_start|>user<|header_end|>\n\n hi <|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nyo <|eot|><|header_start|>user<|header_end|>\n\nq2<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\na2<|eot|>"
    ),
    "gemma": GEMMA_TEXT,
    "gemma3": GEMMA_TEXT,
    "glm4": "[gMASK]<sop><|system|>\nS<|user|>\n hi <|assistant|>\nyo <|user|>\nq2<|assistant|>\na2</s>",
    "chatglm3": "[gMASK]sop<|system|>\nS<|user|>\n hi <|assistant|>\nyo <|user|>\nq2<|assistant|>\na2</s>",
    "deepseek3": "<s>S<｜User｜> hi <｜Assistant｜>yo </s><｜User｜>q2<｜Assistant｜>a2</s>",
    # LLaMA-Factory writes the empty think block before EVERY reply without one (enable_thinking true: as part of
    # the reply; false: of the prompt); we write it only before the last, as R1's and Qwen3's jinja render history
    "deepseekr1": "<s>S<｜User｜> hi <｜Assistant｜>yo </s><｜User｜>q2<｜Assistant｜>"
    + THINK_BLOCK
    + "a2</s>",
    "phi": (
        "<|system|>\nS<|end|>\n<|user|>\n hi <|end|>\n<|assistant|>\nyo <|end|>\n<|user|>\nq2<|end|>\n"
        "<|assistant|>\na2<|end|>\n"
    ),
    "phi4": (
        "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|> hi <|im_end|>"
        "<|im_start|>assistant<|im_sep|>yo <|im_end|><|im_start|>user<|im_sep|>q2<|im_end|>"
        "<|im_start|>assistant<|im_sep|>a2<|im_end|>"
    ),
    "yi": CHATML_TEXT,
    "qwen3_nothink": CHATML_TEXT,
    "intern2": "<s>" + CHATML_TEXT,
    "internlm3": "<s>" + CHATML_TEXT,
    "baichuan2": "S<reserved_106> hi <reserved_107>yo <reserved_106>q2<reserved_107>a2</s>",
}
LF_CONV = conv((" hi ", "yo "), ("q2", "a2"), system="S")


def test_every_ported_template_has_its_llama_factory_text():
    assert set(LF_TEMPLATES) | {"intern2", "internlm3", "qwen3_nothink"} == set(LF_TEXT)
    assert set(LF_TEXT) <= set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(LF_TEXT))
def test_rendering_equals_llama_factorys_format(lf_tokenizer, name):
    template = get_template(name, lf_tokenizer)
    pairs = template.encode_turns(lf_tokenizer, LF_CONV)
    assert rendered(template, lf_tokenizer, LF_CONV) == LF_TEXT[name]
    assert joined(pairs) == ids(lf_tokenizer, LF_TEXT[name])


DEFAULT_SYSTEM = {
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n",
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
}


@pytest.mark.parametrize("name", sorted(DEFAULT_SYSTEM))
def test_a_missing_system_prompt_is_llama_factorys_default(lf_tokenizer, name):
    template = get_template(name, lf_tokenizer)
    with_default = conv((" hi ", "yo "), ("q2", "a2"), system=DEFAULT_SYSTEM[name])
    without = conv((" hi ", "yo "), ("q2", "a2"))
    assert rendered(template, lf_tokenizer, without) == rendered(template, lf_tokenizer, with_default)
    assert rendered(template, lf_tokenizer, without) == LF_TEXT[name].replace("S", DEFAULT_SYSTEM[name], 1)


GENERATION = {  # the generation prompt for [user "q1", assistant "a1", user "q2"], no system prompt
    "llama2": "<s>[INST] q1 [/INST]a1</s><s>[INST] q2 [/INST]",
    "mistral": "<s>[INST] q1[/INST] a1</s>[INST] q2[/INST]",
    "vicuna": DEFAULT_SYSTEM["vicuna"] + "USER: q1 ASSISTANT:a1</s>USER: q2 ASSISTANT:",
    "alpaca": DEFAULT_SYSTEM["alpaca"]
    + "### Instruction:\nq1\n\n### Response:\na1</s>\n\n### Instruction:\nq2\n\n"
    "### Response:\n",
    "glm4": "[gMASK]<sop><|user|>\nq1<|assistant|>\na1<|user|>\nq2<|assistant|>",  # no eos inside the history
    "baichuan2": "<reserved_106>q1<reserved_107>a1<reserved_106>q2<reserved_107>",
    "deepseekr1": "<s><｜User｜>q1<｜Assistant｜>a1</s><｜User｜>q2<｜Assistant｜>" + THINK_BLOCK,
    "empty": "q1a1q2",
}


@pytest.mark.parametrize("name", sorted(GENERATION))
def test_generation_prompt_is_llama_factorys_prompt(lf_tokenizer, name):
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    template = get_template(name, lf_tokenizer)
    assert template.prompt_text(lf_tokenizer, messages) == GENERATION[name]
    assert template.encode_prompt(lf_tokenizer, messages) == ids(lf_tokenizer, GENERATION[name])


# --- what the Template features do ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["glm4", "chatglm3", "baichuan2"])
def test_efficient_eos_ends_only_the_last_reply_and_needs_an_eos(lf_tokenizer, name):
    template = get_template(name, lf_tokenizer)
    eos = lf_tokenizer.eos_token_id
    pairs = template.encode_turns(lf_tokenizer, LF_CONV)
    assert eos not in pairs[0][1] and pairs[1][1][-1] == eos
    no_eos = copy.deepcopy(lf_tokenizer)
    no_eos.eos_token = None
    with pytest.raises(DataError, match=f"template {name} needs the token an eos_token"):
        get_template(name, no_eos)


def test_system_in_user_keeps_only_the_prefix_as_the_head(lf_tokenizer):
    """The system text belongs to the first user turn (LLaMA-Factory's Llama2Template): a truncation that drops
    that exchange drops the system text with it, and only bos stays in front."""
    for name, head in [("gemma", "<s>"), ("mistral", "<s>"), ("llama2", "")]:
        r = get_template(name, lf_tokenizer).render(lf_tokenizer, LF_CONV)
        assert r.prompts[0][: r.head_chars] == head
        assert "S" in r.prompts[0][r.head_chars :]


def test_stop_tokens_are_the_stop_words_and_eos(lf_tokenizer):
    tid = lf_tokenizer.convert_tokens_to_ids
    expected = {
        "gemma": ["<end_of_turn>", "</s>"],
        "glm4": ["<|user|>", "<|observation|>", "</s>"],
        "llama4": ["<|eot|>", "<|eom|>", "</s>"],
        "phi": ["<|end|>", "</s>"],
        "phi4": ["<|im_end|>", "</s>"],
        "llama2": ["</s>"],
    }
    for name, words in expected.items():
        assert get_template(name, lf_tokenizer).stop_token_ids(lf_tokenizer) == tid(words), name


def test_deepseekr1_trains_a_last_reply_thinking_and_strips_earlier_ones(lf_tokenizer):
    template = get_template("deepseekr1", lf_tokenizer)
    c = conv(("q1", "<think>\nold\n</think>\n\nA1"), ("q2", "<think>\nwhy\n</think>\n\nA2"))
    pairs = template.encode_turns(lf_tokenizer, c)
    assert lf_tokenizer.decode(pairs[0][1]) == "A1</s>"
    assert lf_tokenizer.decode(pairs[1][0]) == "<｜User｜>q2<｜Assistant｜>"
    assert lf_tokenizer.decode(pairs[1][1]) == "<think>\nwhy\n</think>\n\nA2</s>"


def test_a_tokenizer_without_the_familys_tokens_is_refused(qwen_tokenizer):
    for name, token in [
        ("gemma", "<start_of_turn>"),
        ("glm4", "[gMASK]"),
        ("deepseek3", "<｜User｜>"),
        ("phi4", "<|im_sep|>"),
        ("llama4", "<|header_start|>"),
        ("baichuan2", "<reserved_106>"),
    ]:
        with pytest.raises(DataError, match=re.escape(f"template {name} needs the token {token}")):
            get_template(name, qwen_tokenizer)


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("name", sorted(LF_TEXT))
def test_exported_jinja_renders_what_the_template_encodes(lf_tokenizer, name, case):
    template = get_template(name, lf_tokenizer)
    c = CONVS[case]
    pairs = template.encode_turns(lf_tokenizer, c)
    theirs = lf_tokenizer.apply_chat_template(c.to_messages(), chat_template=template.jinja(), tokenize=False)
    assert joined(pairs) == ids(lf_tokenizer, theirs)
    history = c.to_messages()[:-1]
    prompt = lf_tokenizer.apply_chat_template(
        history, chat_template=template.jinja(), add_generation_prompt=True, tokenize=False
    )
    assert template.encode_prompt(lf_tokenizer, history) == ids(lf_tokenizer, prompt)
