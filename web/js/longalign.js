// LongAlign for ComfyUI: frontend touches that the Python node API cannot express.
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/

// A fresh LongAlign Text Encode gets a prompt box as tall as a fresh CLIP Text Encode's: its four option
// widgets would otherwise leave the multiline box about two lines tall. Only new nodes: a node restored from a
// workflow (onConfigure ran) keeps its saved size.
const PROMPT_BOX_HEIGHT = 174; // a fresh CLIP Text Encode's text widget height in frontend 1.35.9

app.registerExtension({
  name: "LongAlign.TextEncodePromptBox",
  nodeCreated(node) {
    if (node.comfyClass !== "LongAlignTextEncode") return;
    let restored = false;
    const onConfigure = node.onConfigure;
    node.onConfigure = function (...args) {
      restored = true;
      return onConfigure?.apply(this, args);
    };
    const grow = (tries) => {
      if (restored) return;
      const box = (node.widgets || []).find((w) => w.name === "text");
      if (!box || !box.computedHeight) {
        if (tries > 0) requestAnimationFrame(() => grow(tries - 1)); // not laid out yet
        return;
      }
      const extra = PROMPT_BOX_HEIGHT - box.computedHeight;
      if (extra > 0) {
        node.setSize([node.size[0], node.size[1] + extra]);
        node.setDirtyCanvas(true, true);
      }
    };
    requestAnimationFrame(() => grow(30));
  },
});
