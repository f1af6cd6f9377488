/**
 * signaling.js: a dependency-free browser client for signaling-sharded.
 * A classic `<script src="/signaling.js">` defines two globals:
 * `SignalingClient` (the WebSocket, the peer set, relay and reconnection) and
 * `PeerMesh` (an RTCDataChannel "chat" to every other peer of the topic).
 * Both are EventTargets whose events are CustomEvents carrying `detail`;
 * `on(type, listener)` passes `detail` directly and returns an unsubscribe.
 */
(function (root) {
  "use strict";

  /** Close codes after which reconnecting cannot help (unauthorized, topic full). */
  // Unauthorized, topic full, bad request: retrying cannot succeed.
  const FINAL_CLOSE_CODES = new Set([4001, 4009, 4010, 4400]);
  /** Message types relayed between peers. */
  const RELAY_TYPES = new Set(["offer", "answer", "ice-candidate"]);
  /** Types a client sends that are not unicast relays. */
  const NOT_RELAYS = new Set(["ping", "broadcast", "update-metadata"]);

  /** An EventTarget with `emit(type, detail)` and `on(type, listener)`. */
  class Emitter extends EventTarget {
    /** Dispatch a CustomEvent of `type` carrying `detail`. */
    emit(type, detail) {
      this.dispatchEvent(new CustomEvent(type, { detail }));
    }

    /**
     * Call `listener(detail)` on each event of `type`.
     * @returns {() => void} a function that removes the listener
     */
    on(type, listener) {
      const wrapped = (event) => listener(event.detail);
      this.addEventListener(type, wrapped);
      return () => this.removeEventListener(type, wrapped);
    }
  }

  /**
   * A connection to one topic of a signaling-sharded server.
   *
   * Events: `welcome` (the welcome message), `peers` (a Map of peer id to
   * metadata, after every change), `peer-joined`, `peer-updated` (its new
   * metadata) and `peer-left` ({id, metadata}), `offer` / `answer` / `ice-candidate` (the relayed
   * message: {from, payload, msgId?}; so is any relay type the server's
   * operator allowed with --relay-type), `broadcast` ({from, payload,
   * msgId?}: a peer's message to the whole topic), `server-message` ({payload}: the
   * application's backend speaking, through the admin API), `pong`, `error` (a server error
   * message {code, message, msgId?}, or {code: "socket_error"}), `close`
   * ({code, reason, willReconnect, error}: `error` is the server's error
   * message that came with the close, e.g. `invalid_topic` before 4400,
   * or null), `reconnecting` ({attempt, delay}) and `resumed` ({selfId}: the
   * connection came back and the session with it: same id, same peers,
   * nothing missed; it asks for a resumable session unless
   * `options.resumable` is false). The client does not reconnect after
   * 4001 (unauthorized), 4009 (topic full), 4010 (kicked) or 4400 (an
   * invalid topic or metadata).
   */
  class SignalingClient extends Emitter {
    /**
     * @param {string} topic the topic to join
     * @param {object} [options]
     * @param {string} [options.url] server base url, e.g. "wss://example.org";
     *   default: the page's own host, ws: or wss: after the page's scheme
     * @param {*} [options.metadata] any JSON value shown to the other peers
     * @param {string} [options.token] auth token, when the server needs one
     * @param {boolean} [options.reconnect=true] reconnect after an unexpected close
     * @param {boolean} [options.resumable=true] ask for a session that survives
     *   a lost connection: a reconnect then resumes it (`resumed`)
     * @param {number} [options.minDelay=500] first reconnect delay, in ms
     * @param {number} [options.maxDelay=30000] longest reconnect delay, in ms
     * @param {number} [options.pingInterval=0] seconds between application
     *   pings; 0 turns them off. A connection silent for two intervals is
     *   dropped and reconnected.
     */
    constructor(topic, options = {}) {
      super();
      this.topic = topic;
      const defaults = {
        reconnect: true, resumable: true, minDelay: 500, maxDelay: 30000, pingInterval: 0,
      };
      this.options = { ...defaults, ...options };
      /** @type {string|null} this peer's id, from the latest welcome */
      this.selfId = null;
      /** @type {Map<string, *>} every other peer of the topic: id to metadata (or undefined) */
      this.peers = new Map();
      /** @type {object|null} the latest welcome message (iceServers, pingInterval, ...) */
      this.welcome = null;
      this.ws = null;
      this.closed = false;
      this.attempt = 0;
      this.retryTimer = null;
      this.pingTimer = null;
      this.lastReceived = 0;
      this.resumeToken = null;
      /** Text messages received since the latest welcome, as the server numbers them. */
      this.seen = 0;
      /** @type {object|null} the server's latest error message on this connection */
      this.lastError = null;
    }

    /** The WebSocket url of the topic, with the optional query parameters. */
    get url() {
      let base = this.options.url;
      if (!base) {
        const scheme = root.location.protocol === "https:" ? "wss:" : "ws:";
        base = `${scheme}//${root.location.host}`;
      }
      const query = [];
      if (this.options.metadata !== undefined) {
        query.push(`metadata=${encodeURIComponent(JSON.stringify(this.options.metadata))}`);
      }
      if (this.options.token) query.push(`token=${encodeURIComponent(this.options.token)}`);
      if (this.options.resumable) query.push("resumable=1");
      if (this.resumeToken) {
        query.push(`resume=${encodeURIComponent(this.resumeToken)}`, `seen=${this.seen}`);
      }
      const path = `${base.replace(/\/+$/, "")}/ws/${encodeURIComponent(this.topic)}`;
      return query.length ? `${path}?${query.join("&")}` : path;
    }

    /** True while the WebSocket is open. */
    get connected() {
      return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
    }

    /**
     * Open the connection.
     * @returns {Promise<string>} this peer's id, once the first peer-list is in;
     *   rejected if the connection closes for good before that
     */
    connect() {
      this.closed = false;
      clearTimeout(this.retryTimer);
      if (this.ws) {
        const old = this.ws;
        this.ws = null;
        old.close();
      }
      return new Promise((resolve, reject) => {
        const offPeers = this.on("peers", () => { done(); resolve(this.selfId); });
        const offClose = this.on("close", (info) => {
          if (info.willReconnect) return;
          done();
          reject(new Error(`closed: ${info.code} ${info.reason}`));
        });
        const done = () => { offPeers(); offClose(); };
        this.open();
      });
    }

    /** Close for good: no reconnect afterwards. */
    close(code = 1000, reason = "") {
      this.closed = true;
      clearTimeout(this.retryTimer);
      if (this.ws) this.ws.close(code, reason);
    }

    /**
     * Send a relay message to peer `to`: `offer`, `answer`,
     * `ice-candidate`, or a type the server allows with --relay-type.
     * @param {string} type
     * @param {string} to the target's peer id
     * @param {*} payload any JSON value, relayed as is
     * @param {string} [msgId] echoed in the answer or in an error
     * @returns {boolean} false if not connected (nothing is queued)
     */
    send(type, to, payload, msgId) {
      if (typeof type !== "string" || NOT_RELAYS.has(type)) {
        throw new TypeError(`not a relay type: ${type}`);
      }
      const message = { type, to, payload };
      if (msgId !== undefined) message.msgId = msgId;
      return this.sendRaw(message);
    }

    /**
     * Send `payload` to every other peer of the topic (`broadcast`). A
     * peer whose queue is full misses it: the server then answers one
     * `error` `dropped` with `missed`, the number that did.
     * @returns {boolean} false if not connected (nothing is queued)
     */
    updateMetadata(metadata) {
      // Every other peer gets `peer-updated`; `forbidden` if a token fixed it.
      return this.sendRaw({ type: "update-metadata", metadata });
    }

    broadcast(payload, msgId) {
      const message = { type: "broadcast", payload };
      if (msgId !== undefined) message.msgId = msgId;
      return this.sendRaw(message);
    }

    /** Send an SDP offer (a string or an RTCSessionDescription) to `to`. */
    offer(to, sdp, msgId) {
      return this.send("offer", to, describe("offer", sdp), msgId);
    }

    /** Send an SDP answer (a string or an RTCSessionDescription) to `to`. */
    answer(to, sdp, msgId) {
      return this.send("answer", to, describe("answer", sdp), msgId);
    }

    /** Send an ICE candidate (an RTCIceCandidate or its JSON form) to `to`. */
    iceCandidate(to, candidate, msgId) {
      const payload = typeof candidate.toJSON === "function" ? candidate.toJSON() : candidate;
      return this.send("ice-candidate", to, payload, msgId);
    }

    /** Send an application-level ping; the server answers with `pong`. */
    ping(msgId) {
      return this.sendRaw(msgId === undefined ? { type: "ping" } : { type: "ping", msgId });
    }

    /** Send any message object as JSON; false if not connected. */
    sendRaw(message) {
      if (!this.connected) return false;
      this.ws.send(JSON.stringify(message));
      return true;
    }

    /** Create the WebSocket and wire its handlers. */
    open() {
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (error) {
        this.closed = true;
        this.emit("error", { code: "socket_error", message: String(error) });
        this.emit("close", { code: 0, reason: String(error), willReconnect: false });
        return;
      }
      this.ws = ws;
      ws.onmessage = (event) => this.receive(event.data);
      ws.onerror = () => this.emit("error", { code: "socket_error", message: "WebSocket error" });
      ws.onclose = (event) => this.closedWith(ws, event.code, event.reason);
    }

    /** Handle one text frame from the server. */
    receive(data) {
      this.lastReceived = Date.now();
      if (typeof data === "string") this.seen += 1;
      let message;
      try {
        message = JSON.parse(data);
      } catch {
        return;
      }
      switch (message.type) {
        case "welcome":
          this.lastError = null;
          this.welcome = message;
          this.selfId = message.selfId;
          this.resumeToken = message.resumeToken || null;
          this.seen = 0; // numbering starts again after each welcome
          this.attempt = 0;
          this.startPings();
          this.emit("welcome", message);
          if (message.resumed === true) {
            // The session came back: same id, same view, and what was sent
            // meanwhile follows. No peer-list comes.
            this.emit("resumed", { selfId: this.selfId });
            this.emit("peers", this.peers);
          }
          break;
        case "peer-list":
          this.applyPeerList(message.peers || []);
          break;
        case "peer-joined":
          this.peers.set(message.peerId, message.metadata);
          this.emit("peer-joined", { id: message.peerId, metadata: message.metadata });
          this.emit("peers", this.peers);
          break;
        case "peer-left": {
          const metadata = this.peers.get(message.peerId);
          this.peers.delete(message.peerId);
          this.emit("peer-left", { id: message.peerId, metadata });
          this.emit("peers", this.peers);
          break;
        }
        case "peer-updated":
          if (this.peers.has(message.peerId)) {
            this.peers.set(message.peerId, message.metadata);
            this.emit("peer-updated", { id: message.peerId, metadata: message.metadata });
            this.emit("peers", this.peers);
          }
          break;
        case "server-message":
          this.emit("server-message", { payload: message.payload });
          break;
        case "error":
          this.lastError = message;
          this.emit("error", message);
          break;
        default:
          // A relay (of any type the server relays) or a broadcast: it
          // names its sender.
          if (typeof message.from === "string" || message.type === "pong") {
            this.emit(message.type, message);
          }
      }
    }

    /**
     * Replace the peer set with a fresh `peer-list`; after a reconnect, the
     * differences with the last known set are announced as peer-left and
     * peer-joined events, so that listeners see a consistent history.
     */
    applyPeerList(list) {
      const fresh = new Map(list.map((peer) => [peer.id, peer.metadata]));
      for (const id of [...this.peers.keys()]) {
        if (!fresh.has(id)) {
          const metadata = this.peers.get(id);
          this.peers.delete(id);
          this.emit("peer-left", { id, metadata });
        }
      }
      for (const [id, metadata] of fresh) {
        if (!this.peers.has(id)) {
          this.peers.set(id, metadata);
          this.emit("peer-joined", { id, metadata });
        }
      }
      this.emit("peers", this.peers);
    }

    /** The socket `ws` closed (or was dropped): report it, then maybe reconnect. */
    closedWith(ws, code, reason) {
      if (ws !== this.ws) return;
      ws.onmessage = ws.onerror = ws.onclose = null;
      this.ws = null;
      clearInterval(this.pingTimer);
      const willReconnect = !this.closed && this.options.reconnect && !FINAL_CLOSE_CODES.has(code);
      const error = this.lastError || null;
      this.lastError = null;
      this.emit("close", { code, reason, willReconnect, error });
      if (!willReconnect) {
        this.closed = true;
        return;
      }
      const ceiling = Math.min(this.options.maxDelay, this.options.minDelay * 2 ** this.attempt);
      const delay = Math.round(ceiling * (0.5 + Math.random() / 2));
      this.attempt += 1;
      this.emit("reconnecting", { attempt: this.attempt, delay });
      this.retryTimer = setTimeout(() => { if (!this.closed) this.open(); }, delay);
    }

    /** Ping every `pingInterval` seconds; drop a connection silent for two of them. */
    startPings() {
      clearInterval(this.pingTimer);
      const seconds = this.options.pingInterval;
      if (!(seconds > 0)) return;
      const ws = this.ws;
      this.pingTimer = setInterval(() => {
        if (Date.now() - this.lastReceived > 2000 * seconds) {
          ws.close();
          this.closedWith(ws, 4000, "no answer to ping");
        } else {
          this.ping();
        }
      }, 1000 * seconds);
    }
  }

  /** `{type, sdp}` from an SDP string or a session description. */
  function describe(type, sdp) {
    return typeof sdp === "string" ? { type, sdp } : { type: sdp.type || type, sdp: sdp.sdp };
  }

  /**
   * A full mesh of RTCDataChannels over a SignalingClient: one
   * RTCPeerConnection to every other peer of the topic.
   *
   * Negotiation follows the "perfect negotiation" pattern. Of two peers, the
   * one with the lower selfId (string order) creates the data channel and so
   * makes the offer; it is also the impolite one should offers ever cross
   * (after an ICE restart), so glare resolves the same way on both sides.
   *
   * Events: `open` ({peerId, channel}), `message` ({from, data}),
   * `channel-close` ({peerId}), `state` ({peerId, state}: the connection
   * state) and `error` ({peerId, error}: a negotiation error).
   */
  class PeerMesh extends Emitter {
    /**
     * @param {SignalingClient} client
     * @param {object} [options]
     * @param {string} [options.label="chat"] the data channel's label
     * @param {RTCConfiguration} [options.rtcConfig] default: the welcome's iceServers
     */
    constructor(client, options = {}) {
      super();
      this.client = client;
      this.label = options.label || "chat";
      this.rtcConfig = options.rtcConfig;
      /**
       * Peer id to its link: {pc, channel, polite, makingOffer, ignoreOffer,
       * queue (the promise chain of its incoming signaling)}.
       * @type {Map<string, object>}
       */
      this.links = new Map();
      this.selfId = null;
      this.offs = [
        client.on("welcome", (welcome) => {
          if (this.selfId !== welcome.selfId) this.closeAll(); // a new identity: start over
          this.selfId = welcome.selfId;
        }),
        client.on("peers", (peers) => this.reconcile(peers)),
        client.on("offer", (message) => this.signal(message, "description")),
        client.on("answer", (message) => this.signal(message, "description")),
        client.on("ice-candidate", (message) => this.signal(message, "candidate")),
      ];
      if (client.selfId) {
        this.selfId = client.selfId;
        this.reconcile(client.peers);
      }
    }

    /** Ids of the peers whose data channel is open. */
    get openPeers() {
      const open = ([, link]) => link.channel && link.channel.readyState === "open";
      return [...this.links].filter(open).map(([id]) => id);
    }

    /** Send `data` on every open channel; returns how many peers it went to. */
    send(data) {
      const peers = this.openPeers;
      for (const id of peers) this.links.get(id).channel.send(data);
      return peers.length;
    }

    /** Send `data` to one peer; false if its channel is not open. */
    sendTo(peerId, data) {
      const link = this.links.get(peerId);
      if (!link || !link.channel || link.channel.readyState !== "open") return false;
      link.channel.send(data);
      return true;
    }

    /** Close every connection and stop listening to the client. */
    close() {
      for (const off of this.offs) off();
      this.closeAll();
    }

    /** Open links to new peers (when we offer) and close links to peers gone. */
    reconcile(peers) {
      for (const id of [...this.links.keys()]) if (!peers.has(id)) this.drop(id);
      for (const id of peers.keys()) {
        if (!this.links.has(id) && this.selfId < id) {
          const link = this.link(id);
          this.attach(id, link, link.pc.createDataChannel(this.label));
        }
      }
    }

    /** The link to `peerId`, created on first use. */
    link(peerId) {
      let link = this.links.get(peerId);
      if (link) return link;
      const config = this.rtcConfig || { iceServers: (this.client.welcome || {}).iceServers || [] };
      const pc = new RTCPeerConnection(config);
      const polite = this.selfId > peerId;
      const queue = Promise.resolve();
      link = { pc, channel: null, polite, makingOffer: false, ignoreOffer: false, queue };
      this.links.set(peerId, link);
      pc.onicecandidate = ({ candidate }) => {
        if (candidate) this.client.iceCandidate(peerId, candidate);
      };
      pc.onnegotiationneeded = async () => {
        try {
          link.makingOffer = true;
          await pc.setLocalDescription();
          this.client.offer(peerId, pc.localDescription);
        } catch (error) {
          this.emit("error", { peerId, error });
        } finally {
          link.makingOffer = false;
        }
      };
      pc.ondatachannel = ({ channel }) => {
        if (channel.label === this.label) this.attach(peerId, link, channel);
      };
      pc.onconnectionstatechange = () => {
        this.emit("state", { peerId, state: pc.connectionState });
        if (pc.connectionState === "failed") pc.restartIce();
      };
      return link;
    }

    /** Wire the data channel of a link. */
    attach(peerId, link, channel) {
      link.channel = channel;
      channel.onopen = () => this.emit("open", { peerId, channel });
      channel.onmessage = (event) => this.emit("message", { from: peerId, data: event.data });
      channel.onclose = () => this.emit("channel-close", { peerId });
    }

    /** Handle a relayed message in order, one at a time per peer. */
    signal(message, kind) {
      if (!this.links.has(message.from) && !this.client.peers.has(message.from)) return; // gone
      const link = this.link(message.from);
      const handle = kind === "description" ? this.description : this.candidate;
      link.queue = link.queue
        .then(() => handle.call(this, link, message))
        .catch((error) => this.emit("error", { peerId: message.from, error }));
    }

    /** Apply a remote offer or answer; answer an offer. */
    async description(link, message) {
      const { pc } = link;
      const description = message.payload;
      const busy = link.makingOffer || pc.signalingState !== "stable";
      const collision = description.type === "offer" && busy;
      link.ignoreOffer = !link.polite && collision;
      if (link.ignoreOffer) return;
      await pc.setRemoteDescription(description); // rolls our own offer back if needed
      if (description.type === "offer") {
        await pc.setLocalDescription();
        this.client.answer(message.from, pc.localDescription);
      }
    }

    /** Add a remote ICE candidate (ignored if it belongs to an offer we ignored). */
    async candidate(link, message) {
      try {
        await link.pc.addIceCandidate(message.payload);
      } catch (error) {
        if (!link.ignoreOffer) throw error;
      }
    }

    /** Close the link to `peerId`. */
    drop(peerId) {
      const link = this.links.get(peerId);
      if (!link) return;
      this.links.delete(peerId);
      if (link.channel) {
        link.channel.onclose = null;
        link.channel.close();
      }
      link.pc.close();
      this.emit("channel-close", { peerId });
    }

    closeAll() {
      for (const id of [...this.links.keys()]) this.drop(id);
    }
  }

  SignalingClient.PeerMesh = PeerMesh;
  root.SignalingClient = SignalingClient;
  root.PeerMesh = PeerMesh;
  if (typeof module === "object" && module.exports) module.exports = { SignalingClient, PeerMesh };
})(globalThis);
